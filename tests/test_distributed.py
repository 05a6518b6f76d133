"""Rank discovery under each launcher, from the environment alone."""

from engine.train.distributed import DistributedEnv, discover, slurm_master_port


def test_torchrun_and_deepspeed_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
           "SLURM_STEP_ID": "0"}
    assert discover(env) == DistributedEnv(3, 8, 1, "env")


def test_bare_srun_task():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}
    assert discover(env) == DistributedEnv(5, 8, 1, "slurm")


def test_batch_shell_of_an_allocation_is_not_a_rank():
    # sbatch's own shell has SLURM_PROCID but no job step: one process, not rank 0 of many.
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == DistributedEnv(0, 1, 0, "single")


def test_mpirun_ranks():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert discover(env) == DistributedEnv(2, 4, 0, "mpi")


def test_mpirun_inside_an_allocation_trusts_mpi_when_slurm_describes_the_daemons():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert discover(env) == DistributedEnv(3, 4, 1, "mpi")


def test_nothing_means_one_process():
    assert discover({}) == DistributedEnv(0, 1, 0, "single")


def test_slurm_port_follows_job_and_restart_below_ephemeral_ports():
    assert slurm_master_port("123") == 10123
    assert slurm_master_port("123", "1") == 10000 + (123 + 1009) % 20000
    assert all(10000 <= slurm_master_port(str(j), "3") < 30000 for j in range(0, 100000, 997))
