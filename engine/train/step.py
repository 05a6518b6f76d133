"""One optimizer step: its micro-batches, the per-model gradient clipping, the update.

The step waits for the device once: when the gradient norms come back (one all-reduce, which
also carries the step's stop flag) and decide whether the update happens. Everything else stays
on the device: the batch's masked and non-padding positions are found on the host from the CPU
batch, and the losses and counts are summed on the device and read at log steps only.

Every step's randomness (dropout, sampling) is a function of ``(seed, step, rank)``
(:func:`seed_step`), which makes the RNG state at any step boundary part of every checkpoint by
construction: a resumed run continues with exactly the numbers an uninterrupted run draws.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from data_pipeline.masking import IGNORE_INDEX
from engine.model.encoder import check_token_batch
from engine.model.rtd import flat_positions
from engine.train.clipping import ClipResult
from engine.train.logger import COUNT_NAMES, LOSS_NAMES
from engine.train.parallel import ParallelModel


def seed_step(seed: int, step: int, rank: int) -> None:
    derived = (seed * 1_000_003 + step) * 65_537 + rank
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def device_batch(batch: dict, device: torch.device, vocab_size: int) -> dict:
    """The model's keyword arguments for a CPU micro-batch, checked and indexed on the host."""
    check_token_batch(batch["input_ids"], batch["attention_mask"], vocab_size)
    unpadded = bool(batch["attention_mask"].all())
    return {
        "input_ids": batch["input_ids"].to(device),
        # None lets the attention skip its mask (packed batches have no padding).
        "attention_mask": None if unpadded else batch["attention_mask"].to(device),
        "masked_input_ids": batch["masked_input_ids"].to(device),
        "mlm_labels": batch["mlm_labels"].to(device),
        "selected_index": flat_positions(batch["mlm_labels"] != IGNORE_INDEX).to(device),
        "valid_index": None if unpadded else flat_positions(batch["attention_mask"].bool()).to(device),
        "check_inputs": False,
    }


@dataclass
class StepResult:
    """What a step measured. ``losses`` and ``counts`` are this rank's, on the device."""

    skipped: bool  # a non-finite gradient norm on some rank: no update on any rank
    clip: ClipResult  # per-model gradient norms and clip factors (agreed by all ranks)
    losses: torch.Tensor | None = None  # LOSS_NAMES, mean over the micro-batches
    counts: torch.Tensor | None = None  # COUNT_NAMES, summed over the micro-batches
    group_grad_norms: dict[str, float] = field(default_factory=dict)
    # With ``timed=True`` (benchmarks): seconds in forward+backward and in the optimizer step.
    forward_backward_s: float | None = None
    optimizer_s: float | None = None

    @property
    def stop_requested(self) -> bool:
        return self.clip.stop_requested


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(parallel: ParallelModel, batches: Iterator[dict], accumulation: int, *, stop_requested: bool = False,
               measure_group_norms: bool = False, inject_nan: bool = False, timed: bool = False) -> StepResult:
    """Forward and backward over ``accumulation`` micro-batches, then one update.

    A non-finite gradient on any rank (a non-finite loss, or a diverging generator) skips the
    update on all ranks. ``stop_requested``: this rank got SIGUSR1/SIGTERM; the result says
    whether any rank did. ``inject_nan`` poisons the first micro-batch's loss (fault injection
    for the guard's tests). ``timed`` waits for the device around the phases to time them (a
    benchmark's choice; training does not).
    """
    engine, device = parallel.engine, parallel.device
    vocab_size = parallel.model.config.vocab_size
    if timed:
        _synchronize(device)
    started = time.perf_counter()
    losses = torch.zeros(len(LOSS_NAMES), dtype=torch.float64, device=device)
    counts = torch.zeros(len(COUNT_NAMES), dtype=torch.float64, device=device)
    for micro in range(accumulation):
        engine.set_gradient_accumulation_boundary(micro == accumulation - 1)
        output = engine(**device_batch(next(batches), device, vocab_size))
        loss = output.loss
        if inject_nan and micro == 0:
            loss = loss * float("nan")
        engine.backward(loss)
        losses += torch.stack([loss.detach(), output.mlm_loss.detach(), output.rtd_loss.detach()]).double()
        counts += torch.stack([output.counts[name] for name in COUNT_NAMES]).double()

    group_grad_norms = parallel.group_gradient_norms() if measure_group_norms else {}
    clip = parallel.clipper(stop_requested)  # the step's one wait for the device
    if not clip.finite:
        engine.optimizer.zero_grad()  # drop this step's gradients
        engine.zero_grad()
        return StepResult(skipped=True, clip=clip)
    if timed:
        _synchronize(device)
    backward_done = time.perf_counter()
    engine.step()
    result = StepResult(skipped=False, clip=clip, losses=losses / accumulation, counts=counts,
                        group_grad_norms=group_grad_norms)
    if timed:
        _synchronize(device)
        result.forward_backward_s = backward_done - started
        result.optimizer_s = time.perf_counter() - backward_done
    return result
