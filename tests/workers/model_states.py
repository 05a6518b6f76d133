"""Worker for test_plan: the bytes DeepSpeed's ZeRO-3 engine holds for the model on one rank
(weight partitions, fp32 gradient partitions, fp32 master partitions and Adam's moments) after
one step of dv3's own parallelize/train_step, written by rank 0 to OUT_DIR/states.json.

Run with ``torchrun --nproc_per_node 2 tests/workers/model_states.py OUT_DIR``.
"""

import json
import sys
from pathlib import Path

import torch

from engine.config import build_run_config
from engine.train.distributed import discover, init_process_group, shutdown
from engine.train.parallel import parallelize
from engine.train.step import train_step
from tests.support.models import build_model, rank_batch


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


out_dir = Path(sys.argv[1])
env = discover()
init_process_group(env)
config = build_run_config({}, {"train.micro_batch": 3, "train.global_batch": 6, "train.steps": 10,
                               "train.deepspeed_config": "ds_configs/cpu.json"})
ds_config = config.deepspeed_config(world_size=2, cuda_available=False)
ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
model = build_model("gdes")
parallel = parallelize(model, config, ds_config)
ids, mask, masked, labels, _ = rank_batch(env.rank)
train_step(parallel, iter([{"input_ids": ids, "attention_mask": mask, "masked_input_ids": masked,
                            "mlm_labels": labels}]), accumulation=1)
optimizer = parallel.engine.optimizer
states = {
    "parameters": sum(nbytes(p.ds_tensor) for p in model.parameters()),
    "gradients": nbytes(optimizer.grad_partitions_flat_buffer),  # where ZeRO-3 reduces the gradients to
    "master": sum(nbytes(group) for group in optimizer.fp32_partitioned_groups_flat),
    "moments": sum(nbytes(value) for state in optimizer.optimizer.state.values() for value in state.values()
                   if torch.is_tensor(value) and value.numel() > 1),
}
if env.rank == 0:
    (out_dir / "states.json").write_text(json.dumps(states))
parallel.engine.destroy()
shutdown()
