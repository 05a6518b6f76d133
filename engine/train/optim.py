"""The GDES-aware optimizer split and the learning-rate schedule.

Parameters fall into named groups, each with its own learning rate and weight decay:

    gen_decay, gen_no_decay, disc_decay, disc_no_decay, disc_delta (only when configured)

built from ``named_parameters()`` so a weight shared under ES (or tied to the MLM head)
appears once. Biases and LayerNorm weights get no decay. Empty groups are dropped before
DeepSpeed sees them (it drops them silently, which would misalign anything indexed by group).

The schedule scales each group's *own* base learning rate (DeepSpeed's schedulers give one
lr to every group). A ZeRO-3 universal-checkpoint reload copies every key of group 0 onto
every group, its ``name`` included, so after any load the names are put back by position
(``restore_group_names``) and then each group's settings are re-applied by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from engine.config import OptimSection


@dataclass(frozen=True)
class GroupSettings:
    name: str
    base_lr: float
    weight_decay: float


def _is_no_decay(name: str, parameter: nn.Parameter) -> bool:
    # A ZeRO-3 partitioned parameter is a flat partition: its true shape is ds_shape.
    dimensions = len(getattr(parameter, "ds_shape", parameter.shape))
    return dimensions < 2 or "LayerNorm" in name or name.endswith(".bias")


def group_settings(optim: OptimSection) -> dict[str, GroupSettings]:
    gen_lr = optim.lr * optim.generator_lr_multiplier
    disc_lr = optim.lr * optim.discriminator_lr_multiplier
    settings = {
        "gen_decay": GroupSettings("gen_decay", gen_lr, optim.weight_decay),
        "gen_no_decay": GroupSettings("gen_no_decay", gen_lr, 0.0),
        "disc_decay": GroupSettings("disc_decay", disc_lr, optim.weight_decay),
        "disc_no_decay": GroupSettings("disc_no_decay", disc_lr, 0.0),
    }
    if optim.delta_lr_multiplier is not None or optim.delta_weight_decay is not None:
        multiplier = optim.delta_lr_multiplier if optim.delta_lr_multiplier is not None else optim.discriminator_lr_multiplier
        decay = optim.delta_weight_decay if optim.delta_weight_decay is not None else optim.weight_decay
        settings["disc_delta"] = GroupSettings("disc_delta", optim.lr * multiplier, decay)
    return settings


def build_param_groups(model: nn.Module, optim: OptimSection) -> list[dict]:
    """Named, non-empty parameter groups for ``deepspeed.initialize(model_parameters=...)``."""
    settings = group_settings(optim)
    members: dict[str, list[nn.Parameter]] = {name: [] for name in settings}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        side = "gen" if name.startswith("generator.") else "disc"
        if side == "disc" and name.endswith("delta_weight") and "disc_delta" in settings:
            members["disc_delta"].append(parameter)
        elif _is_no_decay(name, parameter):
            members[f"{side}_no_decay"].append(parameter)
        else:
            members[f"{side}_decay"].append(parameter)
    return [
        {"name": name, "params": params, "lr": settings[name].base_lr, "base_lr": settings[name].base_lr,
         "weight_decay": settings[name].weight_decay}
        for name, params in members.items()
        if params
    ]


class WarmupLinearSchedule:
    """Linear warmup to each group's base lr, then linear decay to ``min_lr_ratio`` of it."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def factor(self, step: int) -> float:
        """Multiplier for the update of optimizer step ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        remaining = max(0, self.total_steps - step)
        span = max(1, self.total_steps - self.warmup_steps)
        return max(self.min_lr_ratio, remaining / span)


def restore_group_names(optimizer, names: list[str]) -> None:
    """Give the optimizer's groups back the names they had before a checkpoint load.

    The order of the groups is ours (``build_param_groups``) and no load changes it; a ZeRO-3
    universal load does overwrite every group's ``name`` with group 0's.
    """
    if len(optimizer.param_groups) != len(names):
        raise RuntimeError(f"the checkpoint load left {len(optimizer.param_groups)} optimizer groups, "
                           f"expected {len(names)} ({names})")
    for group, name in zip(optimizer.param_groups, names, strict=True):
        group["name"] = name


def apply_group_settings(optimizer, settings: dict[str, GroupSettings], factor: float,
                         betas: tuple[float, float], eps: float) -> dict[str, float]:
    """Set every group's lr (base lr x factor), weight decay, betas and eps by its name."""
    lrs = {}
    for group in optimizer.param_groups:
        name = group.get("name")
        if name not in settings:
            raise RuntimeError(f"optimizer group {name!r} is not one of the configured groups {sorted(settings)}")
        group["base_lr"] = settings[name].base_lr
        group["lr"] = settings[name].base_lr * factor
        group["weight_decay"] = settings[name].weight_decay
        group["betas"] = betas
        group["eps"] = eps
        lrs[name] = group["lr"]
    return lrs
