"""Gradient norms and clipping per model: the generator's and the discriminator's, each on its own.

The official DeBERTaV3 recipe trains generator and discriminator as two models, each clipped to
its own norm. dv3 keeps them in one module and one DeepSpeed engine (docs/gdes.md), so DeepSpeed's
clipping would see one joint gradient, dominated by ``lambda * rtd_loss``: at initialisation it
shrank the generator's update by its discriminator's norm. With ``optim.clip_mode: separate``
(the default) DeepSpeed does not clip, and before each update this module

1. sums the squares of this rank's piece of every gradient, per side, on the device;
2. all-reduces them once (the same collective carries the step's stop flag);
3. reads the result on the host: the step's one wait for the device, which decides whether the
   update happens at all (a non-finite norm on any rank skips it);
4. scales each side's gradient by ``min(1, clip / (norm + 1e-6))`` (DeepSpeed's own rule).

"This rank's piece" is the gradient partition it owns under ZeRO-3, its fragment of the flat
fp32 gradient under ZeRO-1/2, and the whole (already averaged) gradient without ZeRO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_grad, safe_set_local_grad
from torch import nn

SIDES = ("generator", "discriminator")
EPSILON = 1e-6  # DeepSpeed's and torch's clip_grad_norm_'s


def side_of_group(group_name: str) -> str:
    return "generator" if group_name.startswith("gen_") else "discriminator"


def local_gradient(parameter: nn.Parameter, stage: int) -> torch.Tensor | None:
    """This rank's piece of ``parameter``'s gradient, as a tensor that may be scaled in place."""
    if stage == 3:
        return safe_get_local_grad(parameter)
    mapping = getattr(parameter, "_hp_mapping", None)
    if stage in (1, 2) and mapping is not None:
        fragment = mapping.get_lp_grad_fragment(parameter._index_in_param_group)
        if fragment is None:
            return None
        flat = fragment.view(-1)
        if flat.numel() == parameter.numel() and mapping.lp_fragment_address.numel != parameter.numel():
            # The bf16 optimizer keeps a whole accumulation buffer per rank; this rank owns a slice of it.
            address = mapping.lp_fragment_address
            flat = flat.narrow(0, address.start, address.numel)
        return flat
    if stage in (1, 2):
        return None  # this rank owns no piece of this parameter
    return parameter.grad


def scale_local_gradient(parameter: nn.Parameter, stage: int, factor: torch.Tensor) -> None:
    gradient = local_gradient(parameter, stage)
    if gradient is None:
        return
    if stage == 3 and gradient._base is None:
        # A copy (offloaded or lower-precision gradients): write the scaled copy back through
        # DeepSpeed. Otherwise ZeRO-3 handed out a view of its own fp32 gradient buffer, scaled in
        # place: no copy and write-back of every gradient (an embedding's is hundreds of MB).
        safe_set_local_grad(parameter, gradient * factor)
    else:
        gradient.mul_(factor.to(gradient.dtype))


@dataclass
class ClipResult:
    norms: dict[str, float]  # per side, before clipping
    factors: dict[str, float]  # what each side's gradient was multiplied by
    finite: bool
    stop_requested: bool  # some rank asked to stop (carried by the same all-reduce)


def squared_norms(parameter_lists: list[list[nn.Parameter]], stage: int, device: torch.device,
                  extra: list[float] = ()) -> torch.Tensor:
    """Collective: the squared L2 norm of each list's gradients over all ranks, then ``extra``
    summed over ranks, in one all-reduce (a device tensor; nothing waits for it here)."""
    squares = []
    for parameters in parameter_lists:
        # One pass over each gradient in its own precision (at least fp32, as torch's
        # clip_grad_norm_ does); only the per-tensor norms are squared and summed in float64. A
        # float64 copy of each gradient cost 1 s a step at `small` (a 128k-row embedding).
        norms = [torch.linalg.vector_norm(gradient.detach(), dtype=_norm_dtype(gradient))
                 for parameter in parameters if (gradient := local_gradient(parameter, stage)) is not None]
        total = torch.zeros((), dtype=torch.float64, device=device)
        if norms:
            total = total + torch.stack(norms).double().square().sum()
        squares.append(total)
    reduced = torch.cat([torch.stack(squares), torch.tensor(list(extra), dtype=torch.float64, device=device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if stage == 0:  # every rank holds the whole averaged gradient: summing would count it world-size times
            reduced[:len(parameter_lists)] /= dist.get_world_size()
        dist.all_reduce(reduced)
    return reduced


def _norm_dtype(gradient: torch.Tensor) -> torch.dtype:
    return torch.float64 if gradient.dtype == torch.float64 else torch.float32


def group_gradient_norms(group_members: dict[str, list[nn.Parameter]], stage: int,
                         device: torch.device) -> dict[str, float]:
    """Collective: the gradient norm of each named optimizer group (log steps only: it waits)."""
    norms = squared_norms(list(group_members.values()), stage, device).sqrt().tolist()
    return dict(zip(group_members, norms, strict=True))


class SideClipper:
    """Per-side gradient norms (every step) and, in ``separate`` mode, the clipping."""

    def __init__(self, group_members: dict[str, list[nn.Parameter]], stage: int, clip_norm: float,
                 clip_separately: bool, device: torch.device) -> None:
        self.members = {side: [p for name, params in group_members.items() if side_of_group(name) == side
                               for p in params] for side in SIDES}
        self.stage = stage
        self.clip_norm = clip_norm
        self.clip_separately = clip_separately
        self.device = device

    def __call__(self, stop_requested: bool) -> ClipResult:
        """Collective, every step: norms, the stop flag of any rank, and the clipping."""
        reduced = squared_norms([self.members[side] for side in SIDES], self.stage, self.device,
                                extra=[1.0 if stop_requested else 0.0])
        norms_tensor = reduced[:len(SIDES)].sqrt()
        factors_tensor = (self.clip_norm / (norms_tensor + EPSILON)).clamp(max=1.0)
        values = torch.cat([norms_tensor, factors_tensor, reduced[len(SIDES):]]).tolist()  # the step's one wait
        norms = dict(zip(SIDES, values[:len(SIDES)], strict=True))
        finite = all(math.isfinite(norm) for norm in norms.values())
        factors = {side: 1.0 for side in SIDES}
        if finite and self.clip_separately and self.clip_norm > 0:
            factors = dict(zip(SIDES, values[len(SIDES):2 * len(SIDES)], strict=True))
            for index, side in enumerate(SIDES):
                if factors[side] < 1.0:
                    for parameter in self.members[side]:
                        scale_local_gradient(parameter, self.stage, factors_tensor[index])
        return ClipResult(norms=norms, factors=factors, finite=finite, stop_requested=values[-1] > 0)
