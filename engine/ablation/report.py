"""The ablation's report: the paper's Tables 1 and 2 with its numbers beside ours, and plots.

Reads only files an evaluated ablation folder holds (``ablation_settings.json``,
``runs/<mode>/ablation_eval.json``, ``runs/<mode>/metrics.jsonl``, ``baseline_eval.json``) and
writes ``report.md``, ``ablation.json``, ``losses.png`` and ``embedding_similarity.png`` beside
them, so ``dv3 ablate --report DIR`` can rebuild them at any time, and the small files can be
copied elsewhere together (the report links the plots by relative path).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from engine.ablation.settings import BASELINE_FILE, EVAL_FILE, SETTINGS_FILE
from engine.errors import InputError

MODE_NAMES = {"es": "ES", "nes": "NES", "gdes": "GDES"}
EMBEDDINGS = ("E_G", "E_D", "E_Delta")
EMBEDDING_NAMES = {"E_G": "E_G", "E_D": "E_D", "E_Delta": "E_Δ"}

# DeBERTaV3 (arXiv 2111.09543), base models. Table 1: average cosine similarity of word
# embeddings; under ES there is one embedding (E_G is E_D). Table 2: MNLI-m accuracy.
PAPER_TABLE1 = {"es": {"E_G": 0.02, "E_D": 0.02}, "nes": {"E_G": 0.45, "E_D": 0.02},
                "gdes": {"E_G": 0.45, "E_D": 0.29, "E_Delta": 0.02}}
PAPER_MNLI_M = {"es": 88.8, "nes": 88.3, "gdes": 89.3}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Training records and embedding-similarity records of a run, one per step (after a resume
    the later line for a step wins), in step order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{path} is missing: {run_dir} is not a dv3 pretrain run")
    training, similarity = {}, {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not JSON ({error})") from error
        if "embedding_similarity" in record:
            similarity[record["step"]] = record
        elif "loss" in record:
            training[record["step"]] = record
    return [training[s] for s in sorted(training)], [similarity[s] for s in sorted(similarity)]


def load_ablation(directory: Path) -> dict:
    """Everything the report needs, or an error naming what is missing."""
    settings_path = directory / SETTINGS_FILE
    if not settings_path.is_file():
        raise InputError(f"{directory} holds no evaluated ablation ({SETTINGS_FILE} is missing): run "
                           f"dv3 ablate --output-dir {directory} first")
    settings = json.loads(settings_path.read_text())
    modes = settings["ablation"]["modes"]
    runs = {}
    for mode in modes:
        run_dir = directory / "runs" / mode
        evaluation = run_dir / EVAL_FILE
        if not evaluation.is_file():
            raise InputError(f"{run_dir} has no {EVAL_FILE}: run `{' '.join(settings['command'])}` to evaluate it")
        training, similarity = read_metrics(run_dir)
        runs[mode] = {"evaluation": json.loads(evaluation.read_text()), "training": training, "similarity": similarity}
    baseline_path = directory / BASELINE_FILE
    baseline = json.loads(baseline_path.read_text()) if baseline_path.is_file() else None
    return {"settings": settings, "runs": runs, "baseline": baseline}


# -- the pattern the paper reports, checked on ours -----------------------------------------------------------


def pattern_checks(runs: dict) -> list[dict]:
    """The paper's Table 1 and 2 relations, each with ours: does it hold here?"""

    def sim(mode: str, name: str) -> float | None:
        if mode not in runs:
            return None
        return runs[mode]["evaluation"]["embedding"]["similarity"].get(name)

    def accuracy(mode: str) -> tuple[float, float] | None:
        tune = runs.get(mode, {}).get("evaluation", {}).get("finetune")
        return (tune["accuracy_mean"], tune["accuracy_std"]) if tune else None

    checks = []

    def add(claim: str, paper: str, ours: str, holds: bool | None, note: str = "") -> None:
        checks.append({"claim": claim, "paper": paper, "ours": ours, "holds": holds, "note": note})

    if sim("nes", "E_G") is not None:
        add("NES: E_G (MLM only) is more similar than E_D (RTD only)", "0.45 > 0.02",
            f"{sim('nes', 'E_G'):.3f} vs {sim('nes', 'E_D'):.3f}", sim("nes", "E_G") > sim("nes", "E_D"))
    if sim("es", "E_G") is not None and sim("nes", "E_G") is not None:
        add("ES: RTD drags the shared embedding to low similarity (ES below NES's E_G)", "0.02 < 0.45",
            f"{sim('es', 'E_G'):.3f} vs {sim('nes', 'E_G'):.3f}", sim("es", "E_G") < sim("nes", "E_G"))
    if sim("gdes", "E_G") is not None and sim("nes", "E_G") is not None:
        close = abs(sim("gdes", "E_G") - sim("nes", "E_G"))
        add("GDES keeps E_G as MLM alone makes it (GDES E_G ≈ NES E_G)", "0.45 = 0.45",
            f"{sim('gdes', 'E_G'):.3f} vs {sim('nes', 'E_G'):.3f}",
            close <= 0.25 * max(abs(sim("nes", "E_G")), 1e-6), "within 25% of NES's value")
    if sim("gdes", "E_Delta") is not None:
        add("GDES: E_G > E_D > E_Δ", "0.45 > 0.29 > 0.02",
            f"{sim('gdes', 'E_G'):.3f} > {sim('gdes', 'E_D'):.3f} > {sim('gdes', 'E_Delta'):.3f}",
            sim("gdes", "E_G") > sim("gdes", "E_D") > sim("gdes", "E_Delta"))
    if sim("gdes", "E_D") is not None and sim("nes", "E_D") is not None:
        add("GDES's E_D is more similar than NES's E_D (it inherits E_G's structure)", "0.29 > 0.02",
            f"{sim('gdes', 'E_D'):.3f} vs {sim('nes', 'E_D'):.3f}", sim("gdes", "E_D") > sim("nes", "E_D"))
    scored = {m: accuracy(m) for m in ("es", "nes", "gdes") if accuracy(m) is not None}
    for better, worse, paper in (("gdes", "es", "89.3 > 88.8"), ("gdes", "nes", "89.3 > 88.3"),
                                 ("es", "nes", "88.8 > 88.3")):
        if better in scored and worse in scored:
            (a, sa), (b, sb) = scored[better], scored[worse]
            spread = math.hypot(sa, sb)
            note = "difference within the seeds' spread" if abs(a - b) <= spread else "beyond the seeds' spread"
            add(f"downstream: {MODE_NAMES[better]} > {MODE_NAMES[worse]}", f"MNLI-m {paper}",
                f"{100 * a:.2f} vs {100 * b:.2f}", a > b, note)
    return checks


# -- plots -----------------------------------------------------------------------------------------------------------


def plot_losses(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("loss", "total loss (MLM + λ·RTD)"), ("mlm_loss", "generator MLM loss"),
              ("rtd_loss", "discriminator RTD loss"), ("generator_accuracy", "generator MLM accuracy"))
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    for axis, (key, title) in zip(axes.flat, panels, strict=True):
        for mode, run in runs.items():
            points = [(r["step"], r[key]) for r in run["training"] if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points, strict=True), label=MODE_NAMES.get(mode, mode), linewidth=1.4)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Training curves per embedding-sharing mode (training batches)")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_similarity(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4.2), sharey=True, constrained_layout=True,
                                squeeze=False)
    for axis, (mode, run) in zip(axes[0], runs.items(), strict=True):
        for name in EMBEDDINGS:
            points = [(r["step"], r["embedding_similarity"][name]) for r in run["similarity"]
                      if name in r["embedding_similarity"]]
            if points:
                style = "--" if mode == "es" and name == "E_D" else "-"  # under ES, E_D is E_G
                axis.plot(*zip(*points, strict=True), style, marker=".", label=EMBEDDING_NAMES[name], linewidth=1.4)
        paper = dict(PAPER_TABLE1.get(mode, {}))
        if mode == "es":  # one embedding: one line
            paper = {"E_G = E_D": paper.get("E_G")} if paper else {}
        for name, value in paper.items():
            axis.axhline(value, color="grey", linewidth=0.6, linestyle=":")
            axis.annotate(f"paper {EMBEDDING_NAMES.get(name, name)} {value}", (0.01, value),
                          xycoords=("axes fraction", "data"), fontsize=7, color="grey", va="bottom")
        axis.set_title(MODE_NAMES.get(mode, mode))
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0][0].set_ylabel("average pairwise cosine similarity")
    figure.suptitle("Word-embedding similarity over training (the paper's Table 1 statistic)")
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- the report ------------------------------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def table1(runs: dict) -> list[str]:
    modes = list(runs)
    lines = ["| Word embedding | " + " | ".join(f"{MODE_NAMES.get(m, m)} ours (paper)" for m in modes) + " |",
             "| --- |" + " --- |" * len(modes)]
    for name in EMBEDDINGS:
        cells = []
        for mode in modes:
            similarity = runs[mode]["evaluation"]["embedding"]["similarity"]
            paper = PAPER_TABLE1.get(mode, {}).get(name)
            if name not in similarity:
                cells.append("—")
                continue
            cell = _number(similarity[name]) + (f" ({paper:.2f})" if paper is not None else "")
            if mode == "es" and name == "E_D" and runs[mode]["evaluation"]["embedding"]["shared_embedding"]:
                cell += " = E_G"
            cells.append(cell)
        lines.append(f"| {EMBEDDING_NAMES[name]} | " + " | ".join(cells) + " |")
    start = []
    for mode in modes:
        first = runs[mode]["similarity"][0] if runs[mode]["similarity"] else None
        if first is not None and first["step"] == 0:
            values = first["embedding_similarity"]
            start.append(f"{MODE_NAMES.get(mode, mode)}: " + ", ".join(
                f"{EMBEDDING_NAMES[k]} {_number(values[k])}" for k in EMBEDDINGS if k in values))
    if start:
        lines += ["", "At initialisation (step 0): " + "; ".join(start) + "."]
    norms = []
    for mode in modes:
        values = runs[mode]["evaluation"]["embedding"].get("norms", {})
        if values:
            text = ", ".join(f"{EMBEDDING_NAMES[k]} {values[k]:.1f}" for k in EMBEDDINGS if k in values)
            if "E_Delta" in values and values.get("E_G"):
                text += f" (‖E_Δ‖/‖E_G‖ = {values['E_Delta'] / values['E_G']:.3f})"
            norms.append(f"{MODE_NAMES.get(mode, mode)}: {text}")
    if norms:
        lines += ["", "Frobenius norms of the tables: " + "; ".join(norms) + "."]
    return lines


def table2(runs: dict, baseline: dict | None) -> list[str]:
    tuned = [m for m in runs if runs[m]["evaluation"].get("finetune")]
    if not tuned:
        return ["No downstream fine-tune was run (--finetune.task none)."]
    first = runs[tuned[0]]["evaluation"]["finetune"]
    task = first["task"]
    lines = [f"| Model | paper: MNLI-m acc | ours: {task} test acc, mean ± std ({len(first['runs'])} seeds) | min–max |",
             "| --- | --- | --- | --- |"]
    for mode in tuned:
        tune = runs[mode]["evaluation"]["finetune"]
        lines.append(f"| {MODE_NAMES.get(mode, mode)} | {PAPER_MNLI_M.get(mode, '—')} | "
                     f"{100 * tune['accuracy_mean']:.2f} ± {100 * tune['accuracy_std']:.2f} | "
                     f"{100 * tune['accuracy_min']:.2f}–{100 * tune['accuracy_max']:.2f} |")
    if baseline is not None:
        tune = baseline["finetune"]
        lines.append(f"| no pretraining (same architecture, random init) | — | "
                     f"{100 * tune['accuracy_mean']:.2f} ± {100 * tune['accuracy_std']:.2f} | "
                     f"{100 * tune['accuracy_min']:.2f}–{100 * tune['accuracy_max']:.2f} |")
    settings = first["settings"]
    lines += ["", f"Task: {first['train_examples']} training and {first['test_examples']} test reviews, balanced, "
              f"from `{first['source']}`; {settings['epochs']:g} epochs, lr {settings['lr']:g}, batch "
              f"{settings['batch_size']}, at most {settings['max_length']} tokens. Our task replaces MNLI, which is "
              "not available offline: the numbers are not comparable across the two columns, only the order of "
              "the rows is."]
    return lines


def held_out_table(runs: dict) -> list[str]:
    lines = ["| Mode | RTD ROC AUC | RTD accuracy | precision (replaced) | recall (replaced) | replaced fraction | "
             "MLM loss | MLM accuracy |", "| --- |" + " --- |" * 7]
    for mode, run in runs.items():
        h = run["evaluation"]["held_out"]
        lines.append(f"| {MODE_NAMES.get(mode, mode)} | {_number(h['rtd_auc'], 4)} | {_number(h['rtd_accuracy'], 4)} | "
                     f"{_number(h['rtd_precision'], 4)} | {_number(h['rtd_recall'], 4)} | "
                     f"{_number(h['replaced_fraction'], 4)} | {_number(h['mlm_loss'], 4)} | "
                     f"{_number(h['mlm_accuracy'], 4)} |")
    first = next(iter(runs.values()))["evaluation"]["held_out"]
    lines += ["", f"{first['sequences']} held-out sequences ({first['tokens']} tokens, {first['masked']} masked) with "
              "the same masks for every mode; each discriminator detects its own generator's replacements, so "
              "the replaced fraction (how often the generator's sample differs from the original) differs by mode. "
              "A precision of — means that discriminator predicted no replaced token at all."]
    if all("baseline_rtd_accuracy" in run["evaluation"]["held_out"] for run in runs.values()):
        always_original = ", ".join(
            f"{MODE_NAMES.get(mode, mode)} {_number(run['evaluation']['held_out']['baseline_rtd_accuracy'], 4)}"
            for mode, run in runs.items())
        lines += ["", f"Trivial baselines on the same tokens: always answering \"original\" has RTD accuracy "
                  f"1 − replaced fraction ({always_original}) and ROC AUC 0.5; predicting the most frequent "
                  f"token has MLM accuracy {_number(first['baseline_mlm_accuracy'], 4)}."]
    return lines


def write_report(directory: Path) -> dict[str, Path]:
    directory = Path(directory)
    ablation = load_ablation(directory)
    runs, settings = ablation["runs"], ablation["settings"]
    paths = {"report": directory / "report.md", "json": directory / "ablation.json",
             "losses_plot": directory / "losses.png", "similarity_plot": directory / "embedding_similarity.png"}
    plot_losses(runs, paths["losses_plot"])
    plot_similarity(runs, paths["similarity_plot"])
    checks = pattern_checks(runs)

    setup = settings["ablation"]
    first_eval = next(iter(runs.values()))["evaluation"]
    run_config = json.loads((directory / "runs" / next(iter(runs)) / "run_config.json").read_text())
    train = run_config["train"]
    tokens = setup["steps"] * train["global_batch"] * setup["seq_len"] if "data.dirs" not in setup["pretrain_overrides"] else None
    lines = [
        "# DeBERTaV3 embedding-sharing ablation: ES vs NES vs GDES",
        "",
        "Command: `" + " ".join(settings["command"]) + "`",
        "",
        f"Setup: preset `{run_config['model']['preset']}`, {setup['steps']} steps of {train['global_batch']} sequences "
        f"(lr {run_config['optim']['lr']:g}, warmup {run_config['optim']['warmup_steps']}, seed {train['seed']}), "
        f"RTD λ {run_config['rtd']['rtd_lambda']:g}, masking `{run_config['rtd']['masking']}` "
        f"{run_config['rtd']['mask_prob']:g}; data {', '.join(f'`{d}`' for d in run_config['data']['dirs'])}"
        + (f" (the `{setup['default_corpus']}` default corpus, vocabulary {setup['vocab_size']}, "
           f"{setup['seq_len']} tokens a sequence; {tokens / 1e6:.2f}M training tokens seen per run)" if tokens else "")
        + f". Evaluated at step {first_eval['step']}.",
        "",
        "## Table 1: average cosine similarity of word embeddings",
        "",
        f"Mean cosine similarity over all pairs of {first_eval['embedding']['sample_rows']} sampled vocabulary rows "
        "(`engine.train.metrics.average_pairwise_cosine`, the rows TensorBoard uses); the paper's base-model values in "
        "parentheses. Under GDES, E_D is what the discriminator reads, E_G + E_Δ.",
        "",
        *table1(runs),
        "",
        "## Table 2: downstream task",
        "",
        *table2(runs, ablation["baseline"]),
        "",
        "## RTD and MLM quality on held-out shards",
        "",
        *held_out_table(runs),
        "",
        "## Does the paper's pattern hold here?",
        "",
        "| Relation | paper | ours | holds | note |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {c['claim']} | {c['paper']} | {c['ours']} | {'yes' if c['holds'] else 'no'} | {c['note']} |"
          for c in checks],
        "",
        "## Curves",
        "",
        f"![losses]({paths['losses_plot'].name})",
        "",
        f"![embedding similarity]({paths['similarity_plot'].name})",
        "",
    ]
    paths["report"].write_text("\n".join(lines))
    summary = {
        "settings": settings,
        "paper": {"table1": PAPER_TABLE1, "mnli_m": PAPER_MNLI_M},
        "runs": {mode: {k: v for k, v in run["evaluation"].items() if k != "key"} |
                 {"step0_similarity": run["similarity"][0]["embedding_similarity"] if run["similarity"] else None}
                 for mode, run in runs.items()},
        "baseline": (ablation["baseline"] or {}).get("finetune"),
        "pattern_checks": checks,
    }
    paths["json"].write_text(json.dumps(summary, indent=2))
    return paths
