"""What a run writes about itself: rank-aware logging, and the step logger.

The step logger owns the averaging window (losses and counts summed on the device over the
updates since the last log step), its all-reduce across ranks, and the three outputs written
from one record: ``metrics.jsonl``, TensorBoard (``<output_dir>/tensorboard``) and a console line.
Rank 0 writes; every rank takes part in the all-reduce.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from engine.model.rtd import rtd_statistics
from engine.train import metrics
from engine.train.clipping import ClipResult

log = logging.getLogger("dv3")

LOSS_NAMES = ("loss", "mlm_loss", "rtd_loss")
COUNT_NAMES = ("masked", "masked_correct", "tokens", "replaced", "predicted_replaced", "true_positive", "rtd_correct")

# Every metric of a log step once: its name in metrics.jsonl -> its TensorBoard tag.
TENSORBOARD_TAGS = {
    "loss": "loss/total", "mlm_loss": "loss/mlm", "rtd_loss": "loss/rtd",
    "generator_accuracy": "generator/accuracy", "masked_fraction": "generator/masked_fraction",
    "discriminator_accuracy": "discriminator/accuracy", "discriminator_precision": "discriminator/precision",
    "discriminator_recall": "discriminator/recall", "replaced_fraction": "discriminator/replaced_fraction",
    "tokens_per_s": "throughput/tokens_per_s", "samples_per_s": "throughput/samples_per_s",
    "model_tflops": "throughput/model_tflops_per_device", "mfu": "throughput/mfu",
    "memory_gib": "memory/peak_gib", "grad_norm": "optim/grad_norm",
}
# Families named per optimizer group or per model (generator, discriminator): prefix in
# metrics.jsonl -> prefix in TensorBoard.
TENSORBOARD_PREFIXES = {"lr/": "optim/lr/", "grad_norm/": "optim/grad_norm/", "clip_factor/": "optim/clip_factor/"}


def setup_logging(rank: int) -> None:
    """Rank 0 talks; other ranks only report warnings and errors."""
    # DeepSpeed still calls collectives that this torch deprecates, warning at every step on every rank.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [dv3 rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class StepLogger:
    def __init__(self, output_dir: Path, *, is_main: bool, world_size: int, device: torch.device, total_steps: int,
                 global_batch: int, seq_len: int, step_flops: float, peak_tflops: float | None) -> None:
        self.is_main = is_main
        self.world_size = world_size
        self.device = device
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.seq_len = seq_len
        self.step_flops = step_flops
        self.peak_tflops = peak_tflops
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard")) if is_main else None
        self.jsonl = open(output_dir / "metrics.jsonl", "a") if is_main else None
        self._new_window()

    def _new_window(self) -> None:
        self.window_start = time.perf_counter()
        self.window_updates = 0
        self.window_losses = torch.zeros(len(LOSS_NAMES), dtype=torch.float64, device=self.device)
        self.window_counts = torch.zeros(len(COUNT_NAMES), dtype=torch.float64, device=self.device)

    def add(self, losses: torch.Tensor, counts: torch.Tensor) -> None:
        """One update's mean losses and summed counts (device tensors; no host sync)."""
        self.window_losses += losses
        self.window_counts += counts
        self.window_updates += 1

    def log_step(self, step: int, lrs: dict[str, float], group_grad_norms: dict[str, float], clip: ClipResult) -> dict:
        """Collective: average the window over ranks and updates, write it, start a new window.

        Learning rates, gradient norms and clip factors are the log step's own (not averaged)."""
        totals = torch.cat([self.window_losses, self.window_counts,
                            torch.tensor([float(self.window_updates)], dtype=torch.float64, device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(totals)
        totals = totals.cpu()
        updates = max(1.0, float(totals[-1]) / self.world_size)
        loss_means = totals[:len(LOSS_NAMES)] / (updates * self.world_size)
        counts = dict(zip(COUNT_NAMES, totals[len(LOSS_NAMES):-1].tolist(), strict=True))
        step_time = (time.perf_counter() - self.window_start) / updates
        tflops = self.step_flops / step_time / 1e12 / self.world_size
        record = {
            "step": step,
            "steps_averaged": int(updates),  # fewer than log.interval right after a resume
            **dict(zip(LOSS_NAMES, loss_means.tolist(), strict=True)),
            **rtd_statistics(counts),
            "tokens_per_s": self.global_batch * self.seq_len / step_time,
            "samples_per_s": self.global_batch / step_time,
            "model_tflops": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "grad_norm": math.sqrt(sum(norm**2 for norm in clip.norms.values())),
            "memory_gib": metrics.peak_memory_gib(),
            **{f"lr/{k}": v for k, v in lrs.items()},
            **{f"grad_norm/{k}": v for k, v in {**group_grad_norms, **clip.norms}.items()},
            **{f"clip_factor/{k}": v for k, v in clip.factors.items()},
        }
        self._write(record)
        if self.is_main:
            log.info("step %d/%d loss %.4f (mlm %.4f, rtd %.4f) gen acc %.3f disc acc %.3f replaced %.3f | "
                     "%.0f tok/s %.2f TFLOP/s/device", step, self.total_steps, record["loss"], record["mlm_loss"],
                     record["rtd_loss"], record["generator_accuracy"], record["discriminator_accuracy"],
                     record["replaced_fraction"], record["tokens_per_s"], record["model_tflops"])
        self._new_window()
        return record

    def log_event(self, event: str, step: int, **details: str) -> None:
        """A line of metrics.jsonl that is not a measurement (e.g. where a resumed run starts)."""
        self._write_json({"step": step, "event": event, **details})

    def log_skipped(self, step: int, skipped_steps: int) -> None:
        self._scalars({"train/skipped_steps": skipped_steps}, step)

    def log_embedding_similarity(self, step: int, similarities: dict[str, float]) -> None:
        self._scalars({f"embedding_similarity/{k}": v for k, v in similarities.items()}, step)
        self._write_json({"step": step, "embedding_similarity": similarities})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()

    # -- outputs ------------------------------------------------------------------------------
    def _write(self, record: dict) -> None:
        tagged = {}
        for name, value in record.items():
            if name in TENSORBOARD_TAGS:
                tagged[TENSORBOARD_TAGS[name]] = value
            for prefix, tag_prefix in TENSORBOARD_PREFIXES.items():
                if name.startswith(prefix):
                    tagged[tag_prefix + name[len(prefix):]] = value
        self._scalars(tagged, record["step"])
        self._write_json(record)

    def _write_json(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def _scalars(self, values: dict[str, float | None], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(tag, value, step)
