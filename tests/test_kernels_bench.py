"""``kernels.bench`` runs end to end on a CPU and writes the figures it printed as JSON."""

import argparse
import json

import torch

from kernels import bench
from kernels.fused import interpreter_active


def test_flop_count_is_the_design_count():
    # B=2, H=12, L=8192, D=64, R=512: the anchor the peers publish (about 29 TFLOP/s at 53.8 ms).
    total = bench.flop_count(2, 12, 8192, 64, 512, "forward+backward")
    assert total == 2 * 12 * (14 * 8192**2 * 64 + 16 * 8192 * 512 * 64)
    assert abs(total / 53.80e-3 / 1e12 - 29) < 1.5


def test_bench_runs_on_cpu_and_writes_json(tmp_path):
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    # fused first, as in the GPU default: it must still be checked against the reference.
    paths = (["fused", "fused-split"] if interpreter_active() else []) + ["reference", "hf", "sdpa", "disentangled-flash"]
    output = tmp_path / "bench.json"
    args = parser.parse_args(
        ["--device", "cpu", "--lengths", "24", "--tokens", "48", "--heads", "1", "--head-dim", "32",
         "--position-buckets", "8", "--max-relative-positions", "32", "--repeats", "1",
         "--no-kernel", "--paths", *paths, "--output", str(output)]
    )
    assert bench.run(args) == 0
    payload = json.loads(output.read_text())
    assert payload["environment"]["torch"] == torch.__version__
    by_key = {(r["path"], r["level"]): r for r in payload["results"] if r["point"] == "L24"}
    reference = by_key[("reference", "layer")]
    for mode in bench.MODES:
        assert reference[mode]["ms"] > 0
    # The reference path is HF's function: same layer output.
    assert by_key[("hf", "layer")]["rel_error_vs_reference"] < 1e-5
    assert "needs CUDA" in by_key[("disentangled-flash", "layer")]["skipped"]
    # The pretraining point (v3's attention dropout 0.1) is timed too.
    pretrain = [r for r in payload["results"] if r["point"] == "pretrain" and r["path"] == "reference"]
    assert pretrain and all(r["dropout"] == 0.1 and r["forward+backward"]["ms"] > 0 for r in pretrain)
    # The ceiling (plain attention, no position terms) exists at the attention level only.
    assert ("sdpa", "layer") not in by_key
    if interpreter_active():
        assert by_key[("fused", "layer")]["rel_error_vs_reference"] < 1e-5
        assert by_key[("fused-split", "layer")]["rel_error_vs_reference"] < 1e-5
        assert any(key.endswith("fused-split vs reference") for key in payload["ratios"])


def test_bench_plots_what_it_measured_and_replots_a_saved_json(tmp_path):
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    output, image = tmp_path / "bench.json", tmp_path / "bench.png"
    args = parser.parse_args(
        ["--device", "cpu", "--lengths", "16", "32", "--tokens", "32", "--heads", "1", "--head-dim", "32",
         "--position-buckets", "8", "--max-relative-positions", "32", "--repeats", "1", "--no-pretrain",
         "--paths", "reference", "sdpa", "--modes", "forward", "forward+backward",
         "--output", str(output), "--plot", str(image)]
    )
    assert bench.run(args) == 0
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 20_000
    payload = json.loads(output.read_text())
    sdpa = [r for r in payload["results"] if r["path"] == "sdpa"]
    assert sdpa and all(r["level"] == "attention" and r["forward+backward"]["ms"] > 0 for r in sdpa)
    drawn = bench.plot_results(payload, tmp_path / "again.png")
    # One line per implementation and level, in each mode.
    expected = {"reference (layer)", "reference (attention)", "sdpa (attention)"}
    assert set(drawn) == {"forward", "forward+backward"}
    assert all(set(labels) == expected for labels in drawn.values()), drawn
    replot = parser.parse_args(["--plot-from", str(output), "--plot", str(tmp_path / "from-json.svg")])
    assert bench.run(replot) == 0
    assert (tmp_path / "from-json.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
