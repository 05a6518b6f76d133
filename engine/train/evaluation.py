"""How good a model is on held-out data: the discriminator's replaced-token detection and the
generator's masked-token prediction, beside what trivial answers would score.

``held_out_quality`` reads the validation shards of a dataset with fixed masks (a seeded shuffle
and masking, the same for every model evaluated with the same settings), so two checkpoints, or a
checkpoint and the model as a run initialised it, are compared on identical inputs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline import PretrainLoader
from data_pipeline.masking import IGNORE_INDEX, MaskingConfig
from engine.errors import InputError
from engine.model import RTDModel


@dataclass(frozen=True)
class HeldOutSettings:
    sequences: int = 1024  # held-out sequences to score (a seeded shuffle); 0 = all
    batch_size: int = 32
    seed: int = 1234  # masking of the held-out sequences and the generator's sampling


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); NaN with one class only."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based, ties get their mean rank
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


@torch.no_grad()
def held_out_quality(model: RTDModel, data_dirs: list[Path], masking: MaskingConfig, settings: HeldOutSettings,
                     progress: bool = True) -> dict:
    """Discriminator and generator quality on the held-out shards of ``data_dirs``, beside the
    trivial baselines: an RTD ROC AUC of 0.5, the accuracy of always answering "original", and
    the MLM accuracy of always predicting the most frequent masked token."""
    loader = PretrainLoader(data_dirs, batch_size=settings.batch_size, split="validation", masking=masking,
                            seed=settings.seed, shuffle=True, max_epochs=1)
    total_rows = loader.info.rows if settings.sequences == 0 else min(settings.sequences, loader.info.rows)
    sampling = torch.Generator().manual_seed(settings.seed)
    scores, labels = [], []
    target_counts = torch.zeros(model.config.vocab_size, dtype=torch.int64)
    sums = {"mlm_loss": 0.0, "masked": 0, "masked_correct": 0, "tokens": 0, "replaced": 0, "predicted_replaced": 0,
            "true_positive": 0, "rtd_correct": 0, "sequences": 0}
    bar = tqdm(total=total_rows, desc="held-out", unit="seq", dynamic_ncols=True, leave=False,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, disable=not progress)
    for batch in loader:
        keep = batch["attention_mask"].sum(-1) > 0  # the last batch of an epoch is padded with empty rows
        remaining = total_rows - sums["sequences"]
        if remaining <= 0:
            break
        rows = torch.nonzero(keep).squeeze(-1)[:remaining]
        if rows.numel() == 0:
            continue
        ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
        output = model(ids, mask, batch["masked_input_ids"][rows], batch["mlm_labels"][rows], sampling_generator=sampling)
        counts = {name: int(value) for name, value in output.counts.items()}
        sums["mlm_loss"] += float(output.mlm_loss) * counts["masked"]
        for name, value in counts.items():
            sums[name] += value
        sums["sequences"] += int(rows.numel())
        targets = batch["mlm_labels"][rows]
        target_counts += torch.bincount(targets[targets != IGNORE_INDEX].long(), minlength=model.config.vocab_size)
        valid = mask.bool()
        scores.append(output.rtd_logits[valid].float().numpy())
        labels.append(output.rtd_labels[valid].numpy())
        bar.update(int(rows.numel()))
    loader.close()
    bar.close()
    if sums["sequences"] == 0:
        raise InputError(f"{', '.join(map(str, data_dirs))}: no held-out sequences to evaluate")

    def ratio(a: str, b: str) -> float:
        return sums[a] / sums[b] if sums[b] else float("nan")

    return {
        "sequences": sums["sequences"], "tokens": sums["tokens"], "masked": sums["masked"], "replaced": sums["replaced"],
        "rtd_auc": roc_auc(np.concatenate(scores), np.concatenate(labels)),
        "rtd_accuracy": ratio("rtd_correct", "tokens"),
        "rtd_precision": ratio("true_positive", "predicted_replaced"),
        "rtd_recall": ratio("true_positive", "replaced"),
        "replaced_fraction": ratio("replaced", "tokens"),
        "mlm_loss": sums["mlm_loss"] / sums["masked"] if sums["masked"] else float("nan"),
        "mlm_accuracy": ratio("masked_correct", "masked"),
        # The trivial answers' scores on the same sequences and masks.
        "baseline_rtd_auc": 0.5,
        "baseline_rtd_accuracy": 1.0 - ratio("replaced", "tokens"),
        "baseline_mlm_accuracy": int(target_counts.max()) / sums["masked"] if sums["masked"] else float("nan"),
    }
