"""``dv3 bench data``: every figure is measured and written, ratios are ours over the baseline's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from data_pipeline import bench
from tests.support.data import build_corpus, build_prepared


@pytest.mark.slow
def test_bench_measures_every_figure_and_writes_json(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    output = tmp_path / "result.json"
    args = parser.parse_args(
        ["--data", str(build_prepared(tmp_path_factory)), "--corpus", str(build_corpus(tmp_path_factory)), "--work-dir", str(tmp_path / "work"), "--seconds", "0.2",
         "--workers", "1", "--documents", "8", "--copy-mib", "16", "--output", str(output)]
    )  # fmt: skip
    assert bench.run(args) == 0
    result = json.loads(output.read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["datasets"] and result["date"]
    for figure in ("tokens_per_s_one_core", "tokens_per_s_all_cores", "prepare_end_to_end_tokens_per_s"):
        assert result["tokenization"][figure] > 0
    for figure in ("single_process_masked", "single_process_unmasked", "workers_masked"):
        assert result["loader"][figure]["tokens_per_s"] > 0 and result["loader"][figure]["batches"] >= 1
    ours, theirs = result["loader"], result["baseline"]
    assert result["ratios"]["single_process"] == pytest.approx(
        ours["single_process_masked"]["tokens_per_s"] / theirs["single_process"]["tokens_per_s"]
    )
    assert result["memory_copy"]["bytes_per_s"] > 0
    assert set(result["targets"]) == {"masked_tokens_per_s_one_core", "ratio_to_datasets"}
    printed = capsys.readouterr().out
    assert "datasets baseline" in printed and "memory copy ceiling" in printed and str(output) in printed
