"""Process-group start-up under any launcher: torchrun, deepspeed, srun, mpirun, or none.

Every launcher ends up as the torch.distributed variables ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``:

- torchrun / the deepspeed launcher / dv3's SLURM template set them;
- a bare ``srun`` leaves ``SLURM_PROCID`` & co, translated here (port from the job id);
- ``mpirun`` leaves ``OMPI_COMM_WORLD_*`` / ``PMI_*``: mpi4py tells every rank rank 0's host
  and a free port there (``deepspeed.init_distributed(auto_mpi_discovery=True)`` fills the rest);
- nothing at all: one process on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # env | slurm | mpi | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def slurm_master_port(job_id: str, restart_count: str | None = None) -> int:
    """The rule of slurm/common.sh: a port in [10000, 30000) from the job id (concurrent jobs on a
    node differ), moved on by the restart count after a requeue; below Linux's ephemeral ports."""
    return 10000 + (int(job_id) + 1009 * int(restart_count or 0)) % 20000


def first_slurm_host(nodelist: str) -> str:
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol: {error}") from error
    return hosts[0]


def _mpi_rank_size(environ: Mapping[str, str]) -> tuple[int, int, int] | None:
    for rank_key, size_key, local_key in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMIX_RANK", "PMIX_SIZE", "MPI_LOCALRANKID"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ):
        if rank_key in environ and size_key in environ:
            return int(environ[rank_key]), int(environ[size_key]), int(environ.get(local_key, 0))
    return None


def discover(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """Rank and world size from the environment, without starting anything."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistributedEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                              int(environ.get("LOCAL_RANK", 0)), "env")
    mpi = _mpi_rank_size(environ)
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and "SLURM_STEP_ID" in environ:
        slurm = DistributedEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                               int(environ.get("SLURM_LOCALID", 0)), "slurm")
        # Under mpirun inside an allocation, SLURM_* describe mpirun's daemons (one per node), not the ranks.
        if mpi is None or mpi[:2] == (slurm.rank, slurm.world_size):
            return slurm
    if mpi is not None:
        return DistributedEnv(mpi[0], mpi[1], mpi[2], "mpi")
    return DistributedEnv(0, 1, 0, "single")


def export_rendezvous(env: DistributedEnv) -> None:
    """Fill in the torch.distributed variables this launcher did not set."""
    if env.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", first_slurm_host(os.environ["SLURM_JOB_NODELIST"]))
        os.environ.setdefault("MASTER_PORT", str(slurm_master_port(os.environ["SLURM_JOB_ID"],
                                                                   os.environ.get("SLURM_RESTART_COUNT"))))
    elif env.launcher == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        address = socket.gethostname() if comm.Get_rank() == 0 else None
        port = (os.environ.get("MASTER_PORT") or str(free_port())) if comm.Get_rank() == 0 else None
        os.environ.setdefault("MASTER_ADDR", comm.bcast(address, root=0))
        os.environ["MASTER_PORT"] = comm.bcast(port, root=0)
    elif env.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ["RANK"] = str(env.rank)
    os.environ["WORLD_SIZE"] = str(env.world_size)
    os.environ["LOCAL_RANK"] = str(env.local_rank)


def prefer_environment_tools() -> None:
    """Put this Python's ``bin`` first on PATH, so DeepSpeed builds its ops with the environment's
    ninja: two ninjas on one machine each judge the other's build stale and rebuild every time."""
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def init_process_group(env: DistributedEnv) -> None:
    """Start torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPUs)."""
    prefer_environment_tools()
    import deepspeed
    import torch

    export_rendezvous(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=env.launcher == "mpi",
                               verbose=False)


def rank0_value(value):
    """Rank 0's ``value`` on every rank (a picklable object; a broadcast when there are several)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Barrier, then destroy the process group before the interpreter exits.

    Left to interpreter teardown, gloo's (and DeepSpeed's shared-memory) worker threads can be
    destroyed while still joinable, and the process aborts with ``terminate called without an
    active exception`` after all of its work is done: a clean run then reports a failure.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
