"""One optimizer step: its micro-batches, the non-finite guard, the update.

Every step's randomness (dropout, sampling) is a function of ``(seed, step, rank)``
(:func:`seed_step`), which makes the RNG state at any step boundary part of every checkpoint
by construction: a resumed run continues with exactly the numbers an uninterrupted run draws.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.train import distributed
from engine.train.logger import COUNT_NAMES
from engine.train.parallel import ParallelModel


def seed_step(seed: int, step: int, rank: int) -> None:
    derived = (seed * 1_000_003 + step) * 65_537 + rank
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


@dataclass
class StepResult:
    """What a step measured (this rank's figures; device tensors, read at log steps only)."""

    skipped: bool  # a non-finite loss on some rank: no update on any rank
    losses: torch.Tensor | None = None  # (loss, mlm, rtd), mean over the micro-batches
    counts: torch.Tensor | None = None  # COUNT_NAMES, summed over the micro-batches
    group_grad_norms: dict[str, float] = field(default_factory=dict)
    # With ``timed=True`` (benchmarks): seconds in forward+backward and in the optimizer step.
    forward_backward_s: float | None = None
    optimizer_s: float | None = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(parallel: ParallelModel, batches: Iterator[dict], accumulation: int, *,
               measure_group_norms: bool = False, inject_nan: bool = False, timed: bool = False) -> StepResult:
    """Forward and backward over ``accumulation`` micro-batches, then one update.

    A non-finite loss on any rank skips the update on all ranks (the step's remaining
    micro-batches are still drawn, so the data stream stays aligned). ``inject_nan`` poisons
    the first micro-batch's loss (fault injection for the guard's tests). ``timed`` waits for the
    device around the phases to time them (a benchmark's choice; training never waits).
    """
    engine, device = parallel.engine, parallel.device
    if timed:
        _synchronize(device)
    started = time.perf_counter()
    skipped = False
    losses = torch.zeros(3, dtype=torch.float64, device=device)
    counts = torch.zeros(len(COUNT_NAMES), dtype=torch.float64, device=device)
    for micro in range(accumulation):
        batch = next(batches)
        if skipped:
            continue
        engine.set_gradient_accumulation_boundary(micro == accumulation - 1)
        # Packed batches have no padding; None lets the attention skip its mask (checked on the host).
        mask = None if bool(batch["attention_mask"].all()) else batch["attention_mask"].to(device)
        output = engine(batch["input_ids"].to(device), mask, batch["masked_input_ids"].to(device),
                        batch["mlm_labels"].to(device))
        loss = output.loss
        if inject_nan and micro == 0:
            loss = loss * float("nan")
        if distributed.any_rank(not bool(torch.isfinite(loss.detach()))):
            skipped = True
            continue
        engine.backward(loss)
        losses += torch.stack([loss.detach(), output.mlm_loss.detach(), output.rtd_loss.detach()]).double()
        counts += torch.stack([output.counts[name] for name in COUNT_NAMES]).double()

    if skipped:
        engine.optimizer.zero_grad()  # drop what earlier micro-batches of this step accumulated
        engine.zero_grad()
        return StepResult(skipped=True)
    group_grad_norms = parallel.group_gradient_norms() if measure_group_norms else {}
    if timed:
        _synchronize(device)
    backward_done = time.perf_counter()
    engine.step()
    result = StepResult(skipped=False, losses=losses / accumulation, counts=counts, group_grad_norms=group_grad_norms)
    if timed:
        _synchronize(device)
        result.forward_backward_s = backward_done - started
        result.optimizer_s = time.perf_counter() - backward_done
    return result
