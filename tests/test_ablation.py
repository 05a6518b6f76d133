"""End-to-end `dv3 ablate`, reduced (a few steps of the tiny preset on the session's tiny dataset):
three ordinary pretrain runs, every cell of the report's tables, ES's single embedding, GDES's
E_Delta starting at zero and moving, and a re-run that trains nothing again."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from engine.train import checkpoint
from tests.support.runs import REPO, run_env

pytestmark = pytest.mark.slow
STEPS = 6
MODES = ("es", "nes", "gdes")


def ablate_command(output, dataset, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "ablate", "--output-dir", str(output), "--data.dirs", str(dataset),
            "--train.steps", str(STEPS), "--train.global-batch", "8", "--train.micro-batch", "8",
            "--log.interval", "2", "--log.embedding-similarity-interval", "3", "--log.progress-bar", "false",
            "--checkpoint.interval", str(STEPS), "--eval.sequences", "24", "--eval.batch-size", "8",
            "--finetune.seeds", "2", "--finetune.train-examples", "32", "--finetune.test-examples", "32",
            "--finetune.epochs", "1", "--finetune.batch-size", "16", "--finetune.max-length", "24", *extra]


def run_ablate(command: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def ablation(tiny_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("ablation") / "ablation"
    run_ablate(ablate_command(output, tiny_dataset))
    return output


def evaluation(ablation, mode: str) -> dict:
    return json.loads((ablation / "runs" / mode / "ablation_eval.json").read_text())


def table_rows(report: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after ``heading``, as cells."""
    lines = report.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start + 2:]:  # after the header and the separator
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


def test_each_mode_is_an_ordinary_pretrain_run_with_the_same_seed_data_and_schedule(ablation, tiny_dataset):
    configs = {}
    for mode in MODES:
        run_dir = ablation / "runs" / mode
        latest = checkpoint.latest_complete(checkpoint.checkpoint_root(run_dir))
        assert latest is not None and checkpoint.read_state(latest)["step"] == STEPS
        configs[mode] = json.loads((run_dir / "run_config.json").read_text())
        assert configs[mode]["rtd"]["sharing"] == mode
    for mode in MODES:
        differing = {(section, name) for section, values in configs[mode].items() if isinstance(values, dict)
                     for name, value in values.items() if configs["gdes"][section][name] != value}
        assert differing <= {("rtd", "sharing")}, differing
    assert configs["es"]["data"]["dirs"] == [str(tiny_dataset)]
    assert configs["es"]["train"]["steps"] == STEPS


def test_report_tables_have_every_cell(ablation):
    report = (ablation / "report.md").read_text()
    number = re.compile(r"^-?\d+\.\d+")
    table1 = {row[0]: row[1:] for row in table_rows(report, "## Table 1")}
    assert set(table1) == {"E_G", "E_D", "E_Δ"}
    for name in ("E_G", "E_D"):
        assert all(number.match(cell) for cell in table1[name]), table1[name]
    assert table1["E_Δ"][:2] == ["—", "—"] and number.match(table1["E_Δ"][2])  # only GDES has an E_Delta
    assert "(0.45)" in table1["E_G"][1] and "(0.29)" in table1["E_D"][2]  # the paper's numbers beside ours

    table2 = table_rows(report, "## Table 2")
    assert [row[0] for row in table2][:3] == ["ES", "NES", "GDES"] and "no pretraining" in table2[3][0]
    assert [row[1] for row in table2[:3]] == ["88.8", "88.3", "89.3"]
    for row in table2:
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", row[2]), row

    summary = json.loads((ablation / "ablation.json").read_text())
    held_out = table_rows(report, "## RTD and MLM quality")
    assert [row[0] for row in held_out] == ["ES", "NES", "GDES"]
    precision = 3  # column index; undefined (shown as —) when a discriminator predicted no replaced token
    for row, mode in zip(held_out, MODES, strict=True):
        for column, cell in enumerate(row[1:], start=1):
            undefined = column == precision and cell == "—" and math.isnan(summary["runs"][mode]["held_out"]["rtd_precision"])
            assert number.match(cell) or undefined, row
    assert "predicted no replaced token" in report

    for mode in MODES:
        held = summary["runs"][mode]["held_out"]
        assert 0.0 <= held["rtd_auc"] <= 1.0 and math.isfinite(held["mlm_loss"])
        assert held["sequences"] == 24
        assert len(summary["runs"][mode]["finetune"]["runs"]) == 2
    for plot in ("losses.png", "embedding_similarity.png"):
        data = (ablation / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"]({plot})" in report


def test_es_generator_and_discriminator_share_one_embedding(ablation):
    from engine.train.export import load_rtd_model

    es = evaluation(ablation, "es")["embedding"]
    assert es["shared_embedding"] is True
    assert es["similarity"]["E_G"] == es["similarity"]["E_D"]
    model, _ = load_rtd_model(checkpoint.latest_complete(checkpoint.checkpoint_root(ablation / "runs" / "es")))
    parameters = model.embedding_parameters()
    assert parameters["E_G"] is parameters["E_D"]
    # NES has two embeddings, trained apart: the same check must see them differ there.
    nes = evaluation(ablation, "nes")["embedding"]
    assert nes["shared_embedding"] is False and nes["similarity"]["E_G"] != nes["similarity"]["E_D"]


def test_gdes_delta_starts_at_zero_and_moves(ablation):
    records = [json.loads(line) for line in (ablation / "runs" / "gdes" / "metrics.jsonl").read_text().splitlines()]
    similarity = {r["step"]: r["embedding_similarity"] for r in records if "embedding_similarity" in r}
    assert similarity[0]["E_Delta"] == 0.0  # zero rows have no direction: exactly 0
    assert similarity[0]["E_D"] == pytest.approx(similarity[0]["E_G"], abs=1e-6)  # E_D = E_G + 0 at the start
    final = evaluation(ablation, "gdes")["embedding"]
    assert final["norms"]["E_Delta"] > 0.0 and final["similarity"]["E_Delta"] != 0.0
    assert final["similarity"]["E_D"] != final["similarity"]["E_G"]
    from engine.train.export import load_rtd_model

    model, _ = load_rtd_model(checkpoint.latest_complete(checkpoint.checkpoint_root(ablation / "runs" / "gdes")))
    delta = model.embedding_parameters()["E_Delta"]
    assert torch.count_nonzero(delta) > 0


def test_rerun_trains_and_evaluates_nothing_again_and_report_rebuilds(ablation, tiny_dataset):
    stamps = {m: (ablation / "runs" / m / "ablation_eval.json").stat().st_mtime_ns for m in MODES}
    result = run_ablate(ablate_command(ablation, tiny_dataset))
    for index, mode in enumerate(MODES, start=1):
        assert f"train {index}/3 {mode}: finished ({STEPS} steps), skipped" in result.stdout
        assert f"evaluate {mode}: step {STEPS} already evaluated" in result.stdout
        assert (ablation / "runs" / mode / "ablation_eval.json").stat().st_mtime_ns == stamps[mode]
    (ablation / "report.md").unlink()
    (ablation / "losses.png").unlink()
    run_ablate([sys.executable, "-m", "engine.cli", "ablate", "--report", str(ablation)])
    assert "## Table 1" in (ablation / "report.md").read_text() and (ablation / "losses.png").is_file()


def test_a_run_trained_with_other_settings_is_refused(ablation, tiny_dataset):
    result = run_ablate(ablate_command(ablation, tiny_dataset, "--train.seed", "7"), expect=2)
    assert "train.seed=0" in result.stderr and "asks for 7" in result.stderr
