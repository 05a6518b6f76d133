"""Worker for test_engine_zero3's clipping test: one RTD step under DeepSpeed ZeRO-3, every
parameter partitioned, through dv3's own parallelize and train_step.

Run with ``torchrun --nproc_per_node 2 tests/workers/clip_zero3.py OUT_DIR CLIP_MODE CLIP_NORM``.
Rank 0 writes every parameter after the update (gathered) and the step's norms and clip factors
to OUT_DIR/result.pt.
"""

import sys
from pathlib import Path

import deepspeed
import torch

from engine.config import build_run_config
from engine.train.distributed import shutdown
from engine.train.parallel import parallelize
from engine.train.step import train_step
from tests.support.models import build_model, rank_batch

out_dir, clip_mode, clip_norm = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
rank = torch.distributed.get_rank()

config = build_run_config({}, {"train.micro_batch": 3, "train.global_batch": 6, "train.steps": 10,
                               "train.deepspeed_config": "ds_configs/cpu.json", "optim.lr": 1e-3,
                               "optim.warmup_steps": 0, "optim.grad_clip": clip_norm, "optim.clip_mode": clip_mode})
ds_config = config.deepspeed_config(world_size=2, cuda_available=False)
ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
model = build_model("gdes")
parallel = parallelize(model, config, ds_config)
assert all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters() if p.ds_numel >= 2), \
    "every parameter must be partitioned for this test to mean anything"

ids, mask, masked, labels, sampling_seed = rank_batch(rank)
batch = {"input_ids": ids, "attention_mask": mask, "masked_input_ids": masked, "mlm_labels": labels}
torch.manual_seed(sampling_seed)
result = train_step(parallel, iter([batch]), accumulation=1)
assert not result.skipped
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
if rank == 0:
    torch.save({"parameters": parameters, "norms": result.clip.norms, "factors": result.clip.factors},
               out_dir / "result.pt")
parallel.engine.destroy()
shutdown()  # a clean exit: see engine.train.distributed.shutdown
