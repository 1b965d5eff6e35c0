"""Recipes: shipped YAML loads, cites the papers' numbers, and matches real parameter names."""

import importlib.resources
import math
import re

import pytest
import torch
import yaml
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.distill.recipe import (
    Stage,
    freeze_for_stage,
    learning_rate_at,
    learning_rate_factor,
    load_recipe,
    lr_scheduler,
    make_optimizer,
    parameter_groups,
    shipped_recipes,
    trainable_parameters,
)
from linvid.models.tiny import tiny_qwen2_5_vl_config

PAPER_RECIPES = ("qwen_rwkv_vl", "linmu", "timeviper", "auroralong")


def _student(recipe):
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=4))
    model = linvid.convert(model, recipe.student, in_place=True)
    if recipe.transv is not None:
        linvid.apply_transv(model, recipe.transv)
    return model


@pytest.fixture(scope="module")
def students():
    """One tiny converted student per student preset (+ TransV), shared by the tests."""
    cache = {}

    def build(recipe):
        key = (recipe.student, recipe.transv)
        if key not in cache:
            cache[key] = _student(recipe)
        return cache[key]

    return build


def _stage(**overrides):
    data = {
        "name": "s",
        "trainable": ["mixer"],
        "losses": {"kl": 1.0},
        "learning_rate": 1e-4,
        "batch_size": 8,
        "data": "synthetic",
        "steps": 100,
    }
    data.update(overrides)
    return Stage.from_dict(data)


def test_every_paper_recipe_has_a_demo():
    names = shipped_recipes()
    for paper in PAPER_RECIPES:
        assert paper in names and f"demo_{paper}" in names


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipe_patterns_match_the_student(name, students):
    recipe = load_recipe(name)
    assert recipe.student is not None
    model = students(recipe)
    names = [n for n, _ in model.named_parameters()]
    for stage in recipe.stages:
        if stage.lora is not None:
            targets = re.compile(stage.lora.target_modules)
            modules = [n for n, _ in model.named_modules() if targets.fullmatch(n)]
            assert modules and all(".mlp." in n for n in modules)
            continue  # its trainable set needs adapters: see the LoRA test
        chosen = {n for n, _ in freeze_for_stage(model, stage)}
        assert chosen <= set(names) and chosen
        assert {n for n, p in model.named_parameters() if p.requires_grad} == chosen
        if not any(r"\.visual\." in pattern for pattern in stage.trainable):
            assert not any(".visual.blocks." in n for n in chosen)  # ViT frozen unless named
        groups = parameter_groups(model, stage)
        assert sum(len(g["params"]) for g in groups) == len(chosen)


def test_qwen_rwkv_vl_numbers_and_stages(students):
    recipe = load_recipe("qwen_rwkv_vl")  # paper 000 Table 5
    assert [s.learning_rate for s in recipe.stages] == [1e-4, 1e-5, 1e-6]
    for stage in recipe.stages:
        assert stage.optimizer.betas == (0.9, 0.95)
        assert stage.optimizer.weight_decay == 0.1
        assert stage.warmup_ratio == 0.03 and stage.schedule == "cosine"
        assert stage.batch_size == 64 and stage.epochs == 1 and stage.steps is None
        assert stage.max_sequence_length == 8192
    assert recipe.stages[2].losses == {"ce": 0.0, "kl": 1.0}
    model = students(recipe)
    rwkv, decoder, llm = ({n for n, _ in trainable_parameters(model, s)} for s in recipe.stages)
    # 4 layers at 25%, late placement: layer 3 is the hybrid layer.
    assert rwkv and all(".layers.3.self_attn.mixer." in n for n in rwkv)
    assert rwkv < decoder and all(".layers.3." in n for n in decoder)
    assert "model.language_model.layers.3.mlp.up_proj.weight" in decoder
    assert decoder < llm and "lm_head.weight" in llm
    assert not any(".visual." in n for n in llm)


def test_paper_numbers_linmu_timeviper_auroralong():
    linmu = load_recipe("linmu")  # paper 003 §4.1, §3.2.2
    assert [s.learning_rate for s in linmu.stages] == [5e-4, 5e-4, 2e-5]
    assert [s.steps for s in linmu.stages] == [10000, 15000, 25000]
    assert linmu.stages[2].lora.rank == 8
    assert linmu.stages[0].losses == {"hidden": 0.5, "kl": 0.5}
    assert linmu.stages[2].losses == {"kl": 0.5, "sequence": 0.5, "ce": 0.5}

    timeviper = load_recipe("timeviper")  # paper 002 §3.3, §4.1
    alignment, instruction = timeviper.stages
    assert alignment.transv is False and instruction.transv is True
    assert {s.learning_rate for s in timeviper.stages} == {1e-5}
    assert [g.learning_rate for g in instruction.parameter_groups] == [5e-5]
    assert alignment.optimizer.weight_decay == 0.01 and instruction.tokens_per_frame == 16

    aurora = load_recipe("auroralong")  # paper 001 Table 1, §4.1
    assert [s.learning_rate for s in aurora.stages] == [1e-4, 4e-5, 1e-5, 8e-6]
    assert [s.batch_size for s in aurora.stages] == [128, 2048, 512, 512]
    assert [s.tome_keep_ratio for s in aurora.stages] == [1.0, 1.0, 0.1, 0.1]
    assert all(s.optimizer.betas == (0.9, 0.999) for s in aurora.stages)


def test_linmu_stages_train_branches_then_lora(students):
    peft = pytest.importorskip("peft")
    recipe = load_recipe("demo_linmu")
    model = _student(recipe)
    flex = {n for n, _ in freeze_for_stage(model, recipe.stages[0])}
    assert flex and not any(".swin." in n or "flex_weight" in n for n in flex)
    both = {n for n, _ in freeze_for_stage(model, recipe.stages[1])}
    assert flex < both and any(".swin." in n for n in both)

    lora = recipe.stages[2]
    with pytest.raises(ValueError, match="no LoRA parameters"):
        trainable_parameters(model, lora)
    wrapped = peft.get_peft_model(model, lora.lora.peft_config())
    chosen = {n for n, _ in freeze_for_stage(wrapped, lora)}
    adapters = {n for n in chosen if "lora_" in n}
    assert adapters and all(".mlp." in n for n in adapters)
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == chosen
    assert not any(n.endswith("mlp.up_proj.base_layer.weight") for n in chosen)


def test_errors_name_stage_and_field(tmp_path):
    cases = [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"losses": {"kd": 1.0}}, "losses"),
        ({"trainable": ["mixer("]}, "trainable"),
        ({"epochs": 1}, "steps"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas"),
        ({"optimizer": {"momentum": 0.9}}, "momentum"),
        ({"lora": {"rank": 0, "alpha": 16, "target_modules": "mlp"}}, "lora.rank"),
        ({"gradient_accumulation": 3}, "gradient_accumulation"),
        ({"tome_keep_ratio": 0.1, "tokens_per_frame": 16}, "tokens_per_frame"),
        ({"learning_rat": 1e-4}, "learning_rat"),
    ]
    for overrides, field in cases:
        with pytest.raises(ValueError, match=re.escape(field)) as error:
            _stage(**overrides)
        assert "stage 's'" in str(error.value)

    path = tmp_path / "bad.yaml"
    shipped = importlib.resources.files("linvid") / "recipes" / "demo_linmu.yaml"
    recipe = yaml.safe_load(shipped.read_text())
    recipe["stages"][1]["schedule"] = "linear"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="stage 'flex_swin'.*'schedule'"):
        load_recipe(path)
    recipe["defaults"]["epochs"] = 2
    recipe["stages"][1]["schedule"] = "cosine"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="stage 'flex'.*exactly one of 'steps' or 'epochs'"):
        load_recipe(path)
    recipe["stages"][0]["epochs"] = 3  # a stage's own length wins over defaults
    del recipe["defaults"]["steps"]
    path.write_text(yaml.safe_dump(recipe))
    lengths = [(s.steps, s.epochs) for s in load_recipe(path).stages]
    assert lengths == [(None, 3.0), (500, None), (250, None)]  # their own steps stay
    with pytest.raises(ValueError, match="shipped"):
        load_recipe("no_such_recipe")


def test_string_numbers_parse_and_unmatched_patterns_are_named(students):
    assert _stage(learning_rate="1e-4").learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as text
    model = students(load_recipe("linmu"))
    pattern = r"\.cross_attention\."
    with pytest.raises(ValueError, match=re.escape(f"stage 's': trainable pattern {pattern!r}")):
        freeze_for_stage(model, _stage(trainable=[pattern]))


def test_schedule_warmup_then_cosine_to_the_minimum():
    stage = _stage(warmup_ratio=0.1, min_learning_rate_ratio=0.1)
    total = 100
    lrs = [learning_rate_at(step, total, stage) for step in range(total + 1)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5e-4)  # linear: half way through 10 warmup steps
    assert lrs[10] == pytest.approx(1e-4)  # peak right after warmup
    assert lrs[total] == pytest.approx(1e-5)  # min ratio 0.1 at the end
    after = lrs[10:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    mid = learning_rate_factor(55, total, stage)  # half way through the cosine
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    constant = _stage(schedule="constant", warmup_ratio=0.0)
    assert {learning_rate_at(s, total, constant) for s in range(total)} == {1e-4}


def test_parameter_groups_lrs_decay_and_scheduler(students):
    recipe = load_recipe("timeviper")
    model = students(recipe)
    stage = recipe.stage("instruction")
    groups = parameter_groups(model, stage)
    transv_names = {n for n, _ in model.named_parameters() if ".transv." in n}
    by_id = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        names = [by_id[id(p)] for p in group["params"]]
        expected = 5e-5 if names[0] in transv_names else 1e-5
        assert group["lr"] == expected and all(
            (n in transv_names) == (expected == 5e-5) for n in names
        )
        dims = {p.ndim >= 2 for p in group["params"]}
        assert len(dims) == 1
        assert group["weight_decay"] == (0.01 if dims.pop() else 0.0)
    assert any(g["lr"] == 5e-5 and g["weight_decay"] == 0.0 for g in groups)  # TransV biases

    optimizer = make_optimizer(model, stage)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    scheduler = lr_scheduler(optimizer, 10, stage)
    assert all(g["lr"] == 0.0 for g in optimizer.param_groups)  # warmup starts at 0
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    ratios = {g["lr"] / g["initial_lr"] for g in optimizer.param_groups}
    assert len(ratios) == 1 and ratios.pop() == pytest.approx(learning_rate_factor(2, 10, stage))


def test_prompt_style_is_read_and_checked(tmp_path):
    assert {stage.prompt_style for stage in load_recipe("auroralong").stages} == {"sandwich"}
    assert {stage.prompt_style for stage in load_recipe("qwen_rwkv_vl").stages} == {"standard"}
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\nstages:\n  - {name: s, trainable: ['x'], losses: {ce: 1}, learning_rate: 1,"
        " batch_size: 1, steps: 1, data: d, prompt_style: spiral}\n"
    )
    with pytest.raises(ValueError, match="prompt_style"):
        load_recipe(path)
