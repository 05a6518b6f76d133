"""The model under DeepSpeed: ZeRO-3 wiring, the named optimizer groups, and the engine.

Generator and discriminator live in one module and one engine (the layout that works under
ZeRO-3, docs/gdes.md). Under ZeRO-3, every parameter a module reads without owning it (the
generator's embedding in the GDES embedding and in the MLM head) is registered as an external
parameter of that module, so it is gathered in that module's hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import set_z3_leaf_module
from torch import nn

from engine.config import OptimSection, RunConfig
from engine.model import RTDModel
from engine.train import metrics
from engine.train.clipping import SideClipper, group_gradient_norms
from engine.train.optim import (
    GroupSettings,
    WarmupLinearSchedule,
    apply_group_settings,
    build_param_groups,
    group_settings,
    restore_group_names,
)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def construct(make_model: Callable[[], RTDModel], ds_config: dict, partitioned: bool, seed: int = 0) -> RTDModel:
    """The model, built whole, or (``partitioned``, ZeRO-3) already cut into per-rank partitions.

    Under ``deepspeed.zero.Init`` each module's parameters are partitioned as soon as the module
    exists, so no rank ever holds the whole model. The model's own initialisation ran on empty
    partitions there; :func:`initialize_partitions` draws it again on each rank's own partition.
    """
    if not partitioned:
        return make_model()
    # zero.Init casts each new tensor to the training dtype *after* creating it, so a whole
    # float32 table (a 251k-row embedding: 0.7 GiB) and its bf16 copy briefly coexist on every
    # rank; created in the training dtype from the start, only the copy ever exists.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(parameter_dtype(ds_config))
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = make_model()
    finally:
        torch.set_default_dtype(previous)
    initialize_partitions(model, model.config.initializer_range, seed)
    return model


def parameter_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed keeps the model's parameters in: bf16 or fp16 when enabled, else fp32."""
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


@torch.no_grad()
def initialize_partitions(model: nn.Module, std: float, seed: int) -> None:
    """``init_weights``'s scheme on ZeRO-3 partitions, without gathering anything: every rule is
    elementwise (normal(0, std) matrices and tables, zero biases, unit LayerNorms, a zero padding
    row), so each rank draws the elements it holds, from a generator of its own (seed, rank)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            local = parameter.ds_tensor
            size = local.ds_numel if hasattr(local, "ds_numel") else local.numel()
            start = rank * size
            count = max(0, min(size, parameter.ds_numel - start))  # the last partition may be padded
            held = local.view(-1)[:count]
            if isinstance(module, nn.Linear | nn.Embedding) and name == "weight":
                held.copy_(torch.empty(count).normal_(0.0, std, generator=generator))
                padding = getattr(module, "padding_idx", None)
                if padding is not None:  # the padding row's elements, where this partition holds them
                    row = parameter.ds_shape[-1]
                    low, high = max(padding * row - start, 0), min((padding + 1) * row - start, count)
                    if low < high:
                        held[low:high].zero_()
            elif isinstance(module, nn.Linear) and name == "bias":
                held.zero_()
            elif isinstance(module, nn.LayerNorm):
                held.fill_(1.0 if name == "weight" else 0.0)


@torch.no_grad()
def load_weights(model: RTDModel, weights: dict[str, torch.Tensor] | None, partitioned: bool) -> None:
    """Copy ``weights`` (parameter name -> value) into the model. Partitioned: module by module,
    gathering only that module's parameters; only rank 0 needs ``weights`` (others pass None)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    rank = dist.get_rank() if dist.is_initialized() else 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in names]
        if not own:
            continue
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0, enabled=partitioned):
            if rank == 0 or not partitioned:
                for parameter in own:
                    value = weights.get(names[id(parameter)])
                    if value is not None:
                        if tuple(value.shape) != tuple(parameter.shape):
                            raise ValueError(f"{names[id(parameter)]}: {tuple(value.shape)} in the checkpoint, "
                                             f"{tuple(parameter.shape)} in the model")
                        parameter.copy_(value)


@dataclass
class ParallelModel:
    """The DeepSpeed engine around an ``RTDModel``, with what dv3 keeps beside it."""

    engine: deepspeed.DeepSpeedEngine
    stage: int
    optim: OptimSection
    settings: dict[str, GroupSettings]
    schedule: WarmupLinearSchedule
    # The model's parameters per group, kept apart: DeepSpeed's optimizer rewrites the groups'
    # "params" (to flat fp32 partitions) and a checkpoint load replaces the group dicts.
    group_members: dict[str, list[nn.Parameter]]
    clipper: SideClipper  # per-model gradient norms every step; the clipping in `separate` mode

    @property
    def model(self) -> RTDModel:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return next(p.device for p in self.engine.module.parameters())

    def set_learning_rates(self, step: int) -> dict[str, float]:
        """Every group's settings by name, its lr scaled by the schedule at ``step``."""
        return apply_group_settings(self.engine.optimizer, self.settings, self.schedule.factor(step),
                                    (self.optim.beta1, self.optim.beta2), self.optim.eps)

    def restore_after_load(self, group_names: list[str], step: int) -> None:
        """A ZeRO-3 universal load renames every group after group 0: put the names back."""
        restore_group_names(self.engine.optimizer, group_names)
        self.set_learning_rates(step)

    def group_gradient_norms(self) -> dict[str, float]:
        return group_gradient_norms(self.group_members, self.stage, self.device)

    def weights_finite(self) -> bool:
        """Collective: whether every weight is finite (each rank checks what it holds)."""
        bad = torch.zeros((), device=self.device)
        for parameter in self.engine.module.parameters():
            held = parameter.ds_tensor if hasattr(parameter, "ds_tensor") else parameter.data  # ZeRO-3: the partition
            if held.numel():
                bad += (~torch.isfinite(held)).any().float()
        if dist.is_initialized():
            dist.all_reduce(bad)
        return float(bad) == 0

    def embedding_similarities(self, rows: torch.Tensor) -> dict[str, float]:
        """Table 1 statistic for E_G, E_D and (GDES) E_Delta; collective under ZeRO-3."""
        parameters = self.model.embedding_parameters()
        with deepspeed.zero.GatheredParameters(list(parameters.values()), enabled=self.stage == 3):
            return metrics.embedding_similarities(parameters, rows)


def parallelize(model: RTDModel, config: RunConfig, ds_config: dict) -> ParallelModel:
    """Register ZeRO-3's external parameters, build the named groups, start the DeepSpeed engine."""
    stage = zero_stage(ds_config)
    if stage == 3:
        for module, parameter in model.external_parameter_uses():
            deepspeed.zero.register_external_parameter(module, parameter)
        # Each encoder layer is one ZeRO-3 unit: one hook gathers all its parameters before its
        # forward (and before its recomputation) instead of one hook on each of its sub-modules:
        # far fewer hooks a step, and a compiled layer stays one graph with the gathering outside
        # it instead of a graph broken at every projection. A layer that runs more than once per
        # forward stays as it is: ZeRO-3 would reduce such a unit's gradient once per run.
        for layer in model.layers_run_once():
            set_z3_leaf_module(layer, True)
    param_groups = build_param_groups(model, config.optim)
    group_members = {group["name"]: list(group["params"]) for group in param_groups}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config)
    device = next(p.device for p in engine.module.parameters())
    parallel = ParallelModel(
        engine=engine, stage=stage, optim=config.optim, settings=group_settings(config.optim),
        schedule=WarmupLinearSchedule(config.train.steps, config.optim.warmup_steps, config.optim.min_lr_ratio),
        group_members=group_members,
        clipper=SideClipper(group_members, stage, config.optim.grad_clip,
                            clip_separately=config.optim.clip_mode == "separate", device=device))
    parallel.set_learning_rates(0)
    return parallel
