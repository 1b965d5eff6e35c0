"""AuroraLong-style stages: `tome_keep_ratio` merges every frame of the student's videos to that
share of its tokens (ce only), an epoch-long stage, and the shipped AuroraLong recipes."""

import json

import pytest
import torch
from distill_workspace import write_workspace
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.cli import main
from linvid.distill.recipe import load_recipe
from linvid.distill.trainer import check_recipe
from linvid.models.frame_tome import merged_video_batch
from linvid.models.tiny import tiny_qwen2_5_vl_config

SIZE = 56 * 56
RECIPE = """
name: test_auroralong
student: rwkv6-all
defaults: {steps: 2, batch_size: 2, data: test, learning_rate: 1.0e-3, losses: {ce: 1.0}}
stages:
  - name: connector
    trainable: ['\\.visual\\.merger\\.']
    tome_keep_ratio: 1.0
    epochs: 1  # 6 samples in batches of 2: 3 steps
  - name: language
    trainable: ['\\.visual\\.', '\\.language_model\\.|(^|\\.)lm_head\\.']
    tome_keep_ratio: 0.25
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tome")
    write_workspace(root)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def command(workspace, out, recipe):
    return [
        "distill", "--recipe", recipe,
        "--teacher", str(workspace / "teacher"), "--data", str(workspace / "train.jsonl"),
        "--out", str(out), "--num-frames", "4",
        "--min-pixels", str(SIZE), "--max-pixels", str(SIZE),
    ]  # fmt: skip


def test_keep_ratio_stage_trains(workspace, tmp_path):
    out = tmp_path / "run"
    assert main(command(workspace, out, str(workspace / "recipe.yaml"))) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["connector"] * 3 + ["language"] * 2
    assert all(torch.isfinite(torch.tensor(row["ce"])) for row in rows)
    assert linvid.load(out / "student") is not None


def test_keep_ratio_budget_per_frame():
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=2)).eval()
    config = model.config
    # 2 temporal patches of 4x4 merged cells (8x8 patches): 16 tokens per frame.
    ids = torch.tensor([[5] * 3 + [config.video_token_id] * 32 + [6, 7, 8]])
    labels = torch.full_like(ids, -100)
    labels[0, -2:] = ids[0, -2:]
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "mm_token_type_ids": (ids == config.video_token_id).long() * 2,
        "video_grid_thw": torch.tensor([[2, 8, 8]]),
        "pixel_values_videos": torch.randn(128, 3 * 2 * 14 * 14),
    }
    with torch.no_grad():
        merged = merged_video_batch(model, inputs, None, keep_ratio=0.25)
    video = int((merged["input_ids"] == config.video_token_id).sum())
    assert video == 2 * 4  # round(0.25 x 16) per frame
    assert merged["labels"][0, -2:].tolist() == [7, 8]
    (features,) = merged["mm_encoder_outputs"]["video"].pooler_output
    assert features.shape[0] == video


@pytest.mark.parametrize("recipe", ["auroralong", "demo_auroralong"])
def test_shipped_auroralong_recipes_are_accepted(recipe):
    check_recipe(load_recipe(recipe))  # ratio 0.1 stages train with ce only


def test_keep_ratio_with_kl_is_refused(tmp_path):
    path = tmp_path / "kl.yaml"
    path.write_text(
        RECIPE.replace("tome_keep_ratio: 0.25", "tome_keep_ratio: 0.25\n    losses: {kl: 1.0}")
    )
    with pytest.raises(ValueError, match="'tome_keep_ratio' with losses \\['kl'\\]"):
        check_recipe(load_recipe(path))


def test_shipped_demo_auroralong_runs_with_sandwich_prompts(workspace, tmp_path):
    out = tmp_path / "demo"
    assert main([*command(workspace, out, "demo_auroralong"), "--max-steps", "2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
