"""The run configuration: file + flag overrides, validation that names the field."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import RunConfig, add_config_flags, build_run_config, overrides_from_args
from engine.config.encoder import PRESETS
from engine.config.loading import read_config_file
from engine.errors import ConfigError


def parse_flags(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return overrides_from_args(parser.parse_args(argv))


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: xsmall\ntrain:\n  steps: 50\n  micro_batch: 4\n  global_batch: 8\n")
    config = build_run_config(read_config_file(path), parse_flags(["--train.steps", "200", "--rtd.sharing", "nes",
                                                                    "--data.dirs", "a,b", "--data.weights", "1,3"]))
    assert config.model.preset == "xsmall"
    assert config.train.steps == 200 and config.train.micro_batch == 4
    assert config.rtd.sharing == "nes"
    assert config.data.dirs == ["a", "b"] and config.data.weights == [1.0, 3.0]


def test_json_config_and_defaults(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"optim": {"lr": 5e-4}, "output_dir": "runs/x"}))
    config = build_run_config(read_config_file(path))
    assert config.optim.lr == 5e-4 and config.output_dir == "runs/x"
    assert config.rtd.rtd_lambda == 50.0 and config.optim.beta2 == 0.98 and config.optim.eps == 1e-6


@pytest.mark.parametrize("data, message", [
    ({"train": {"steps": "many"}}, "train.steps: expected an integer"),
    ({"train": {"stepz": 3}}, "train.stepz: unknown field"),
    ({"trainer": {}}, "trainer: unknown section"),
    ({"rtd": {"enhanced_mask_decoder": "maybe"}}, "rtd.enhanced_mask_decoder: expected true or false"),
    ({"optim": {"lr": [1]}}, "optim.lr: expected a number"),
])
def test_bad_values_are_refused_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config(data)


@pytest.mark.parametrize("overrides, message", [
    ({"model.preset": "giant"}, "model.preset"),
    ({"rtd.sharing": "both"}, "rtd.sharing"),
    ({"rtd.masking": "span"}, "rtd.masking"),
    ({"train.global_batch": 10, "train.micro_batch": 4}, "train.global_batch"),
    ({"data.dirs": "a,b", "data.weights": "1"}, "data.weights"),
    ({"train.deepspeed_config": "nowhere.json"}, "train.deepspeed_config"),
    ({"resume": "/no/such/checkpoint"}, "resume"),
    ({"rtd.generator_layers": 0}, "rtd.generator_layers"),
    ({"model.hidden_dropout_prob": 1.5}, "model.hidden_dropout_prob=1.5"),
    ({"model.max_position_embeddings": 100}, "model.max_position_embeddings=100"),
])
def test_validation_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):  # a RunConfig is validated as it is built
        build_run_config({"train": {"deepspeed_config": "ds_configs/cpu.json"}}, overrides)


def test_global_batch_must_split_over_the_world():
    config = build_run_config({}, {"train.global_batch": 24, "train.micro_batch": 4})
    assert config.gradient_accumulation_steps(2) == 3
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch"):
        config.gradient_accumulation_steps(4)


def test_unparseable_config_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml does not parse"):
        read_config_file(path)


def test_deepspeed_config_gets_dv3_settings_and_refuses_disagreement(tmp_path):
    config = build_run_config({}, {"train.global_batch": 16, "train.micro_batch": 4, "optim.clip_mode": "joint",
                                   "train.deepspeed_config": "ds_configs/cpu.json"})
    ds = config.deepspeed_config(world_size=2, cuda_available=False)  # 16 = 4 x 2 ranks x 2 accumulated
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98] and ds["optimizer"]["params"]["torch_adam"] is True
    # Clipped per model by dv3 (the default): DeepSpeed must not clip the joint gradient as well.
    separate = build_run_config({}, {"train.global_batch": 16, "train.micro_batch": 4,
                                     "train.deepspeed_config": "ds_configs/cpu.json"})
    assert separate.deepspeed_config(world_size=2, cuda_available=False)["gradient_clipping"] == 0.0

    conflicting = tmp_path / "ds.json"
    conflicting.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}))
    config = build_run_config({}, {"train.global_batch": 16, "train.micro_batch": 4,
                                   "train.deepspeed_config": str(conflicting)})
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 disagrees"):
        config.deepspeed_config(world_size=2, cuda_available=False)




@pytest.mark.parametrize("content, message", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, r"optimizer.params.lr=0.1 disagrees .*\(0.0001\)"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}}, "optimizer.params.betas=.* disagrees"),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
    ([{"zero_optimization": {"stage": 3}}], "a DeepSpeed config is a JSON object, got list"),
])
def test_deepspeed_config_values_dv3_owns_or_cannot_use_are_refused(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    config = build_run_config({}, {"train.global_batch": 8, "train.micro_batch": 4, "train.deepspeed_config": str(path)})
    with pytest.raises(ConfigError, match=message):
        config.deepspeed_config(world_size=2, cuda_available=False)


def test_every_field_has_a_flag():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    flags = {action.option_strings[0] for action in parser._actions if action.option_strings}
    config = RunConfig()
    for section in ("model", "rtd", "data", "optim", "train", "checkpoint", "log"):
        for name in vars(getattr(config, section)):
            assert f"--{section}.{name.replace('_', '-')}" in flags


def test_pretrain_refuses_a_folder_that_is_not_a_checkpoint_in_one_line(tmp_path):
    not_a_checkpoint = tmp_path / "step00000010"
    not_a_checkpoint.mkdir()
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "engine.cli", "pretrain", "--config", "configs/tiny_cpu.yaml",
                             "--output-dir", str(tmp_path / "run"), "--resume", str(not_a_checkpoint)],
                            cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"dv3 pretrain: error: resume: {not_a_checkpoint} is not a complete dv3 checkpoint (no COMPLETE or dv3_state.json)")
    assert not (tmp_path / "run").exists()


RECIPES = ("xsmall", "small", "base", "large", "mbase")


@pytest.mark.parametrize("name", RECIPES)
def test_each_official_recipe_loads_with_the_official_settings_and_names_its_sources(name):
    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    config = build_run_config(read_config_file(path))
    assert config.model.preset == name
    layers = PRESETS[name].num_hidden_layers
    assert config.rtd.generator_layers == layers // 2  # the official generators are half as deep
    assert (config.rtd.sharing, config.rtd.enhanced_mask_decoder, config.rtd.masking) == ("gdes", True, "official")
    assert (config.rtd.rtd_lambda, config.rtd.mask_prob, config.rtd.temperature) == (50.0, 0.15, 1.0)
    assert (config.optim.clip_mode, config.optim.grad_clip, config.optim.min_lr_ratio) == ("separate", 1.0, 0.0)
    assert (config.optim.beta1, config.optim.beta2, config.optim.eps, config.optim.weight_decay) == (0.9, 0.98, 1e-6, 0.01)
    assert config.optim.warmup_steps == 10000 and config.train.steps == 1_000_000
    assert config.train.global_batch % config.train.micro_batch == 0
    # Every recipe setting names its source in a comment on its line; how often to log and how many
    # checkpoints to keep are dv3's choices, not the recipe's.
    own_choices = ("keep", "interval", "embedding_similarity_interval")
    settings = [line for line in path.read_text().splitlines()
                if line.startswith("  ") and not line.strip().startswith("#")]
    unsourced = [line for line in settings if "#" not in line and line.split(":")[0].strip() not in own_choices]
    assert not unsourced, f"{path.name}: settings without a source: {unsourced}"


def test_compile_with_bf16_on_a_cpu_is_refused_and_fp32_is_not(monkeypatch):
    from engine.train.trainer import check_compile_is_sound

    monkeypatch.delenv("DV3_ATTENTION", raising=False)
    config = build_run_config({}, {"train.compile": True})
    with pytest.raises(ConfigError, match="train.compile: with bf16 on a CPU"):
        check_compile_is_sound(config, {"bf16": {"enabled": True}}, cuda=False)
    check_compile_is_sound(config, {"bf16": {"enabled": False}}, cuda=False)
    check_compile_is_sound(config, {"bf16": {"enabled": True}}, cuda=True)
    check_compile_is_sound(build_run_config({}, {}), {"bf16": {"enabled": True}}, cuda=False)
