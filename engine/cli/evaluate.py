"""``dv3 evaluate``: how well a checkpoint detects replaced tokens and predicts masked ones on
held-out data, beside trivial answers (and, with ``--from-start``, beside the model the run began with)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DESCRIPTION = """\
Score a checkpoint on the held-out (validation) shards of its run's data, or of --data: the
discriminator's ROC AUC and accuracy at telling replaced tokens from original ones, and the
generator's accuracy and loss on masked tokens. Beside them, what trivial answers score on the
same sequences and masks: AUC 0.5, always answering "original", always predicting the most
frequent masked token. --from-start also scores the model exactly as the run initialised it, so
the table shows what training changed. The masks and the generator's sampling come from --seed:
two evaluations with the same settings see the same inputs.
"""

ROWS = (  # (result key, label, trivial answer's key, what the trivial answer is)
    ("rtd_auc", "discriminator ROC AUC", "baseline_rtd_auc", "chance"),
    ("rtd_accuracy", "discriminator accuracy", "baseline_rtd_accuracy", 'always "original"'),
    ("mlm_accuracy", "generator accuracy (masked)", "baseline_mlm_accuracy", "the most frequent token"),
    ("mlm_loss", "generator loss (masked)", None, ""),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="held-out RTD and MLM quality of a checkpoint, beside baselines",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder, or a run directory (its newest verified checkpoint)")
    parser.add_argument("--data", action="append", metavar="DIR",
                        help="data directory whose validation shards to read (repeat; default: the run's data.dirs)")
    parser.add_argument("--sequences", type=int, default=1024, help="held-out sequences to score, 0 = all "
                        "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=1234, help="masks and sampling (default: %(default)s)")
    parser.add_argument("--from-start", action="store_true",
                        help="also score the model as the run initialised it (same seed and settings)")
    parser.add_argument("--output", type=Path, help="also write the figures as JSON")
    parser.set_defaults(func=run)


def format_table(results: dict[str, dict]) -> str:
    columns = list(results)
    lines = [f"{'':32}" + "".join(f"{name:>10}" for name in columns) + f"{'trivial':>10}"]
    for key, label, baseline_key, baseline_name in ROWS:
        values = "".join(f"{results[c][key]:>10.4f}" if math.isfinite(results[c][key]) else f"{'—':>10}"
                         for c in columns)
        baseline = f"{results[columns[-1]][baseline_key]:>10.4f}  ({baseline_name})" if baseline_key else ""
        lines.append(f"{label:32}{values}{baseline}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # The model, DeepSpeed's checkpoint reader and the loader: only when the command runs.
    from engine.config import RTDConfig
    from engine.errors import InputError
    from engine.model import RTDModel
    from engine.train.evaluation import HeldOutSettings, held_out_quality
    from engine.train.export import checkpoint_of, load_rtd_model
    from engine.train.step import seed_step

    if args.sequences < 0 or args.batch_size < 1:
        raise InputError("--sequences must be >= 0 and --batch-size >= 1")
    path = checkpoint_of(args.checkpoint)
    model, state = load_rtd_model(path)
    config = state.get("config", {})
    data_dirs = [Path(d) for d in (args.data or config.get("data", {}).get("dirs", []))]
    if not data_dirs:
        raise InputError(f"{path} records no data directories; pass --data")
    masking = RTDConfig.from_dict(config["rtd"]).masking_config if "rtd" in config else model.rtd.masking_config
    settings = HeldOutSettings(args.sequences, args.batch_size, args.seed)
    results = {}
    if args.from_start:
        if config.get("model", {}).get("init_from"):
            raise InputError(f"{path} continued a Hugging Face model: its start is that model, evaluate it directly")
        seed_step(config.get("train", {}).get("seed", 0), 0, 0)  # what the run did before building its model
        results["start"] = held_out_quality(RTDModel.from_description(state).eval(), data_dirs, masking, settings)
    results[f"step {state['step']}"] = held_out_quality(model, data_dirs, masking, settings)
    first = next(iter(results.values()))
    print(f"held-out: {first['sequences']} sequences, {first['masked']} masked tokens, {first['tokens']} tokens "
          f"of {', '.join(map(str, data_dirs))} (seed {args.seed})")
    print(format_table(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"checkpoint": str(path), "results": results}, indent=2) + "\n")
    return 0
