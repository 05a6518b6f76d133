"""The model under DeepSpeed: ZeRO-3 wiring, the named optimizer groups, and the engine.

Generator and discriminator live in one module and one engine (the layout that works under
ZeRO-3, docs/gdes.md). Under ZeRO-3, every parameter a module reads without owning it (the
generator's embedding in the GDES embedding and in the MLM head) is registered as an external
parameter of that module, so it is gathered in that module's hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
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
