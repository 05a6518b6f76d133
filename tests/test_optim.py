"""The GDES-aware optimizer split and the per-group schedule."""

import torch

from engine.config import OptimSection
from engine.train.optim import WarmupLinearSchedule, apply_group_settings, build_param_groups, group_settings
from tests.support.models import build_model


def names_by_group(groups):
    return {group["name"]: group for group in groups}


def test_groups_split_generator_and_discriminator_with_no_decay_on_biases_and_layernorms():
    model = build_model("gdes")
    groups = names_by_group(build_param_groups(model, OptimSection(weight_decay=0.01)))
    assert set(groups) == {"gen_decay", "gen_no_decay", "disc_decay", "disc_no_decay"}
    by_id = {id(p): name for name, p in model.named_parameters()}
    for group_name, group in groups.items():
        for parameter in group["params"]:
            name = by_id[id(parameter)]
            assert name.startswith("generator." if group_name.startswith("gen") else "discriminator."), name
            no_decay = parameter.dim() < 2 or "LayerNorm" in name or name.endswith(".bias")
            assert no_decay == group_name.endswith("no_decay"), name
    assert groups["gen_no_decay"]["weight_decay"] == 0.0 and groups["disc_decay"]["weight_decay"] == 0.01
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters())), "every parameter exactly once"


def test_delta_group_when_configured_and_empty_groups_dropped():
    model = build_model("gdes")
    groups = names_by_group(build_param_groups(model, OptimSection(lr=1e-4, delta_lr_multiplier=10.0,
                                                                   delta_weight_decay=0.0)))
    assert len(groups["disc_delta"]["params"]) == 1
    assert groups["disc_delta"]["lr"] == 1e-3 and groups["disc_delta"]["weight_decay"] == 0.0
    # NES has no E_Delta: the configured delta group is empty and must not reach DeepSpeed.
    nes = names_by_group(build_param_groups(build_model("nes"), OptimSection(delta_lr_multiplier=10.0)))
    assert "disc_delta" not in nes


def test_es_shared_embedding_appears_once():
    model = build_model("es")
    groups = build_param_groups(model, OptimSection())
    shared = model.generator.word_embeddings.weight
    assert sum(any(p is shared for p in g["params"]) for g in groups) == 1


def test_schedule_warms_up_then_decays_each_group_from_its_own_base():
    schedule = WarmupLinearSchedule(total_steps=100, warmup_steps=10)
    assert schedule.factor(0) == 0.1 and schedule.factor(9) == 1.0
    assert schedule.factor(55) == 0.5 and schedule.factor(100) == 0.0
    model = build_model("gdes")
    optim = OptimSection(lr=1e-3, generator_lr_multiplier=0.5)
    optimizer = torch.optim.AdamW(build_param_groups(model, optim))
    # Simulate a universal-checkpoint reload that copied group 0's settings everywhere.
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 123.0, 9.0
    lrs = apply_group_settings(optimizer, group_settings(optim), schedule.factor(55), (0.9, 0.98), 1e-6)
    assert lrs["gen_decay"] == 0.5e-3 * 0.5 and lrs["disc_decay"] == 1e-3 * 0.5
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups}["gen_no_decay"] == 0.0


def test_groups_of_a_model_built_partitioned_follow_the_true_shapes():
    """Under ZeRO-3's zero.Init a parameter is an empty flat partition; its shape is ds_shape."""
    model = build_model("gdes")
    expected = {group["name"]: len(group["params"]) for group in build_param_groups(model, OptimSection())}
    for parameter in model.parameters():  # what zero.Init leaves behind
        parameter.ds_shape = parameter.shape
        parameter.data = torch.empty(0)
    got = {group["name"]: len(group["params"]) for group in build_param_groups(model, OptimSection())}
    assert got == expected and expected["gen_decay"] > 0 and expected["disc_decay"] > 0
