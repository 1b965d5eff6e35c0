"""AuroraLong-style stages: `tome_keep_ratio` merges every frame of the student's videos to that
share of its tokens (ce only), an epoch-long stage, and the shipped AuroraLong recipes.

The end-to-end runs watch the student's inputs (`student_inputs`) and its language model's
forward: a stage with keep ratio r < 1 hands the language model max(1, round(r x n)) tokens for
each frame of n merged tokens (paper 001 §3.2.2, here after the vision tower), a stage with ratio
1 hands it every token, and each stage changes exactly the weights its patterns train."""

import json
import re

import pytest
import torch
from distill_workspace import write_workspace
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

import linvid
import linvid.distill.trainer as trainer
from linvid.cli import main
from linvid.distill.recipe import load_recipe
from linvid.distill.trainer import check_recipe
from linvid.models.frame_tome import merged_video_batch
from linvid.models.tiny import tiny_qwen2_5_vl_config

SIZE = 56 * 56
LANGUAGE_KEEP_RATIO = 0.25
CONNECTOR = ["\\.visual\\.merger\\."]
LANGUAGE = ["\\.visual\\.", "\\.language_model\\.|(^|\\.)lm_head\\."]
RECIPE = f"""
name: test_auroralong
student: rwkv6-all
defaults: {{steps: 2, batch_size: 2, data: test, learning_rate: 1.0e-3, losses: {{ce: 1.0}}}}
stages:
  - name: connector
    trainable: {json.dumps(CONNECTOR)}
    tome_keep_ratio: 1.0
    epochs: 1  # 6 samples in batches of 2: 3 steps
  - name: language
    trainable: {json.dumps(LANGUAGE)}
    tome_keep_ratio: {LANGUAGE_KEEP_RATIO}
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


@pytest.fixture
def student_calls(monkeypatch):
    """One record per student forward of a run: the stage, the data loader's batch (token
    ids, attention mask, video grids), the token ids `student_inputs` gives the student and
    the sequence length its language model then runs on (a forward pre-hook)."""
    calls = []
    student_inputs, build_models = trainer.student_inputs, trainer.build_models

    def recorded_inputs(stage, model, batch, transv, feature_cache=None):
        inputs, labels = student_inputs(stage, model, batch, transv, feature_cache)
        calls.append(
            {
                "stage": stage.name,
                "video_token_id": model.config.video_token_id,
                "merge_size": model.config.vision_config.spatial_merge_size,
                "batch_ids": batch["input_ids"].clone(),
                "batch_mask": batch["attention_mask"].clone(),
                "grids": batch["video_grid_thw"].tolist(),
                "ids": inputs["input_ids"].clone(),
                "mask": inputs["attention_mask"].clone(),
            }
        )
        return inputs, labels

    def hooked_models(options, recipe):
        teacher, student, tokenizer = build_models(options, recipe)

        def record_length(module, args, kwargs):
            calls[-1]["language_model_length"] = kwargs["inputs_embeds"].shape[1]

        student.model.language_model.register_forward_pre_hook(record_length, with_kwargs=True)
        return teacher, student, tokenizer

    monkeypatch.setattr(trainer, "student_inputs", recorded_inputs)
    monkeypatch.setattr(trainer, "build_models", hooked_models)
    return calls


def video_tokens(ids, mask, video_token_id) -> list[int]:
    return ((ids == video_token_id) & mask.bool()).sum(-1).tolist()


def check_video_budget(call, keep_ratio: float):
    """The student got max(1, round(keep_ratio x n)) video tokens for each frame (temporal
    patch) of n merged tokens, every other token of its sample, and its language model ran on
    the longest of these sequences."""
    batch_video = video_tokens(call["batch_ids"], call["batch_mask"], call["video_token_id"])
    seen_video = video_tokens(call["ids"], call["mask"], call["video_token_id"])
    lengths = []
    for i, (frames, height, width) in enumerate(call["grids"]):
        per_frame = (height // call["merge_size"]) * (width // call["merge_size"])
        assert batch_video[i] == frames * per_frame  # the loader's placeholders: every token
        kept = frames * max(1, round(keep_ratio * per_frame))
        assert seen_video[i] == kept, (call["stage"], i)
        lengths.append(int(call["batch_mask"][i].sum()) - batch_video[i] + kept)
    assert call["mask"].sum(-1).tolist() == lengths
    assert call["language_model_length"] == max(lengths)


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def matching(names, patterns) -> set[str]:
    return {name for name in names if any(re.search(pattern, name) for pattern in patterns)}


def test_keep_ratio_stage_trains_its_parameters_on_fewer_video_tokens(
    workspace, tmp_path, student_calls
):
    """Stage "connector" (ratio 1, 3 steps) hands the language model all 4 tokens of each
    frame and changes exactly the merger's weights; stage "language" (ratio 0.25, 2 steps)
    hands it 1 token per frame and changes every weight its patterns name, the vision tower's
    included (gradients flow through the merge)."""
    out = tmp_path / "run"
    assert (
        main([*command(workspace, out, str(workspace / "recipe.yaml")), "--checkpoint-every", "3"])
        == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["connector"] * 3 + ["language"] * 2
    assert all(torch.isfinite(torch.tensor(row["ce"])) for row in rows)
    assert [call["stage"] for call in student_calls] == ["connector"] * 3 + ["language"] * 2
    for call in student_calls:
        check_video_budget(call, 1.0 if call["stage"] == "connector" else LANGUAGE_KEEP_RATIO)
    per_sample = [video_tokens(c["ids"], c["mask"], c["video_token_id"]) for c in student_calls]
    assert per_sample[0][0] == 4 * per_sample[-1][0]  # 4 merged tokens per frame, then 1

    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(workspace / "teacher")
    torch.manual_seed(0)  # as the trainer converts (seed 0)
    start = linvid.convert(teacher, "rwkv6-all").state_dict()
    after_connector = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
    final = linvid.load(str(out / "student")).state_dict()
    connector = changed(start, after_connector)
    assert connector == matching(start, CONNECTOR) and connector
    language = changed(after_connector, final)
    assert language == matching(start, LANGUAGE)
    assert any(".visual.blocks." in name for name in language)


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
        RECIPE.replace(
            f"tome_keep_ratio: {LANGUAGE_KEEP_RATIO}",
            f"tome_keep_ratio: {LANGUAGE_KEEP_RATIO}\n    losses: {{kl: 1.0}}",
        )
    )
    with pytest.raises(ValueError, match="'tome_keep_ratio' with losses \\['kl'\\]"):
        check_recipe(load_recipe(path))


def test_shipped_demo_auroralong_runs_with_sandwich_prompts(workspace, tmp_path, student_calls):
    """The demo recipe's first stage (ratio 1, sandwich prompts): every sample the student
    gets asks its question before the video and again after it (paper 001 §3.2.3), with every
    video token of its frames."""
    out = tmp_path / "demo"
    assert main([*command(workspace, out, "demo_auroralong"), "--max-steps", "2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    tokenizer = AutoTokenizer.from_pretrained(workspace / "teacher")
    question = tokenizer("what is here", add_special_tokens=False)["input_ids"]
    assert len(question) == 3
    assert len(student_calls) == 2
    for call in student_calls:
        check_video_budget(call, 1.0)
        for ids, mask in zip(call["ids"], call["mask"], strict=True):
            ids = ids[mask.bool()].tolist()
            video = [i for i, token in enumerate(ids) if token == call["video_token_id"]]
            before, after = ids[: video[0]], ids[video[-1] + 1 :]
            assert any(before[i : i + len(question)] == question for i in range(len(before)))
            assert any(after[i : i + len(question)] == question for i in range(len(after)))
