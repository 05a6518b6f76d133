"""Worker for test_engine_zero3's compile test: one RTD step under DeepSpeed ZeRO-3 with eager
layers, then one from the same weights with ``train.compile``'s compiled layers.

Run with ``torchrun --nproc_per_node 2 tests/workers/compile_zero3.py OUT_DIR``. Rank 0 writes
both steps' losses and updated parameters (gathered), Dynamo's graph-break and graph counts, and
the ZeRO-3 hooks on a layer and on one of its sub-modules to OUT_DIR/result.pt.
"""

import copy
import sys
from pathlib import Path

import deepspeed
import torch
import torch._dynamo.utils

from engine.config import build_run_config
from engine.train.distributed import shutdown
from engine.train.parallel import parallelize
from engine.train.step import train_step
from tests.support.models import build_model, rank_batch

out_dir = Path(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
rank = torch.distributed.get_rank()

config = build_run_config({}, {"train.micro_batch": 3, "train.global_batch": 6, "train.steps": 10,
                               "train.deepspeed_config": "ds_configs/cpu.json", "optim.lr": 1e-3,
                               "optim.warmup_steps": 0})
ds_config = config.deepspeed_config(world_size=2, cuda_available=False)
ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
ids, mask, masked, labels, sampling_seed = rank_batch(rank)
batch = {"input_ids": ids, "attention_mask": mask, "masked_input_ids": masked, "mlm_labels": labels}

result = {}
for name in ("eager", "compiled"):
    model = build_model("gdes")  # the same initial weights both times
    if name == "compiled":
        model.compile_layers()
    parallel = parallelize(model, config, copy.deepcopy(ds_config))
    layer = model.discriminator.deberta.encoder.layer[0]
    torch.manual_seed(sampling_seed)
    step = train_step(parallel, iter([batch]), accumulation=1)
    assert not step.skipped
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        parameters = {key: p.detach().clone() for key, p in model.named_parameters()}
    result[name] = {"losses": step.losses.tolist(), "parameters": parameters,
                    "layer_hooks": len(layer._forward_pre_hooks),
                    "sub_module_hooks": len(layer.attention.self.query_proj._forward_pre_hooks)}
    parallel.engine.destroy()

counters = torch._dynamo.utils.counters
result["graph_breaks"] = dict(counters["graph_break"])
result["unique_graphs"] = counters["stats"]["unique_graphs"]
if rank == 0:
    torch.save(result, out_dir / "result.pt")
shutdown()  # a clean exit: see engine.train.distributed.shutdown
