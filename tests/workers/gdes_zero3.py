"""Worker for test_engine_zero3: one GDES backward under DeepSpeed ZeRO-3, every parameter
partitioned, the model built partitioned (deepspeed.zero.Init) as dv3 pretrain builds it.

Run with ``torchrun --nproc_per_node 2 tests/workers/gdes_zero3.py OUT_DIR SHARING``. Rank 0 writes
the initial weights (gathered) to OUT_DIR/initial.pt; each rank writes the full (gathered)
gradients of E_G and of E_Delta/E_D to OUT_DIR/rank<r>.pt.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from engine.config import OptimSection
from engine.train.optim import build_param_groups
from engine.train.parallel import construct
from tests.support.models import build_model, rank_batch

out_dir, sharing = Path(sys.argv[1]), sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
rank = torch.distributed.get_rank()

config = json.loads(Path("ds_configs/cpu.json").read_text())
config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
config.update(train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=1, train_batch_size=6,
              gradient_clipping=0.0)
config["optimizer"]["params"].update(lr=1e-3)
model = construct(lambda: build_model(sharing), config, partitioned=True)
assert all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters() if p.ds_numel >= 2), \
    "the model must be built partitioned for this test to mean anything"
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
if rank == 0:
    torch.save(initial, out_dir / "initial.pt")
for module, parameter in model.external_parameter_uses():
    deepspeed.zero.register_external_parameter(module, parameter)
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=build_param_groups(model, OptimSection()),
                                       config=config)
assert all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters() if p.ds_numel >= 2), \
    "every parameter must be partitioned for this test to mean anything"

ids, mask, masked, labels, sampling_seed = rank_batch(rank)
torch.manual_seed(sampling_seed)
output = engine(ids, mask, masked, labels)
engine.backward(output.loss)
gradients = {name: safe_get_full_grad(parameter).clone() for name, parameter in model.embedding_parameters().items()}
torch.save({"gradients": gradients, "loss": output.loss.detach()}, out_dir / f"rank{rank}.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # a clean exit: see engine.train.distributed.shutdown
