"""TimeViper-style stages in the distillation loop: a recipe-level TransV schedule, a stage with
TransV off and one with TransV on and per-frame ToMe (ce only), on a tiny teacher."""

import json
from types import SimpleNamespace

import pytest
import torch
from distill_workspace import write_workspace
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.cli import main
from linvid.distill.recipe import load_recipe
from linvid.distill.trainer import check_recipe, shared_prompt_length
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.transv import apply_transv, set_transv_enabled

SIZE = 56 * 56
RECIPE = """
name: test_timeviper
student: mamba2-hybrid-25
transv: paper
defaults:
  steps: 2
  batch_size: 2
  data: test
  learning_rate: 1.0e-3
  losses: {ce: 1.0}
stages:
  - name: alignment
    trainable: ['\\.visual\\.merger\\.']
    transv: false
  - name: instruction
    trainable: ['\\.visual\\.merger\\.', '\\.language_model\\.|(^|\\.)lm_head\\.']
    parameter_groups:
      - {pattern: '\\.transv\\.', learning_rate: 5.0e-2}
    transv: true
    tokens_per_frame: 2
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("transv")
    write_workspace(root, num_layers=4)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def arguments(workspace, out, recipe, *extra):
    return [
        "distill",
        "--recipe",
        str(recipe),
        "--teacher",
        str(workspace / "teacher"),
        "--plan",
        "mamba2-hybrid-25",
        "--data",
        str(workspace / "train.jsonl"),
        "--out",
        str(out),
        "--num-frames",
        "4",
        "--min-pixels",
        str(SIZE),
        "--max-pixels",
        str(SIZE),
        *extra,
    ]


def alphas(weights: dict) -> dict:
    found = {key: value for key, value in weights.items() if ".transv." in key and "alpha" in key}
    assert found, "the student has no TransV alpha"
    return found


def test_transv_off_then_on_with_tome(workspace, tmp_path):
    out = tmp_path / "run"
    # Stop after stage 1, then run both stages: stage 1 must leave TransV alone.
    assert (
        main(
            arguments(workspace, tmp_path / "first", workspace / "recipe.yaml", "--max-steps", "2")
        )
        == 0
    )
    first = tmp_path / "first" / "student" / "model.linvid.safetensors"
    after_first = alphas(load_file(str(first)))
    assert all(float(value.abs().max()) == 0 for value in after_first.values())  # alpha starts at 0

    assert main(arguments(workspace, out, workspace / "recipe.yaml")) == 0
    after_both = alphas(load_file(str(out / "student" / "model.linvid.safetensors")))
    assert any(float(value.abs().max()) > 0 for value in after_both.values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["stage"] for row in rows] == ["alignment"] * 2 + ["instruction"] * 2
    assert all(torch.isfinite(torch.tensor(row["ce"])) for row in rows)
    student = linvid.load(out / "student")  # saved with its TransV schedule
    assert student.config.linvid_transv


def test_shipped_demo_timeviper_runs(workspace, tmp_path):
    out = tmp_path / "demo"
    recipe = "demo_timeviper"
    assert main(arguments(workspace, out, recipe, "--max-steps", "2")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]


def test_check_recipe_refuses_kl_with_tome(tmp_path):
    path = tmp_path / "kl.yaml"
    path.write_text(
        RECIPE.replace("tokens_per_frame: 2", "tokens_per_frame: 2\n    losses: {kl: 1.0}")
    )
    with pytest.raises(ValueError, match="tokens_per_frame"):
        check_recipe(load_recipe(path))


def test_transv_switch_and_prompt_length_check():
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=4)).eval()
    student = linvid.convert(teacher, "mamba2-hybrid-25").eval()
    config = student.config
    ids = torch.full((1, 20), 5)
    ids[:, 3:11] = config.video_token_id
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == config.video_token_id).int() * 2,
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
        "pixel_values_videos": torch.randn(32, 3 * 2 * 14 * 14),
    }
    with torch.no_grad():
        plain = student(**inputs).logits
        apply_transv(student, "paper")
        on = student(**inputs, transv_prompt_length=15).logits
        set_transv_enabled(student, False)
        off = student(**inputs, transv_prompt_length=15).logits
    assert (on[0].abs().sum(-1) == 0).any()  # TransV dropped vision tokens
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    labels = torch.full((2, 6), -100)
    labels[0, 3:] = 1
    labels[1, 4:] = 1
    with pytest.raises(ValueError, match="prompt length"):
        shared_prompt_length(labels, SimpleNamespace(name="instruction"))


def test_step_losses_runs_the_student_once_with_the_prompt_length(workspace):
    """With TransV on, the student's logits are those of one forward with
    transv_prompt_length = the first answer token (teacher forcing), not of a second forward
    that treats the answer as part of the prompt."""
    from transformers import AutoTokenizer

    from linvid.distill.data import VideoConversationDataset, model_inputs, read_conversations
    from linvid.distill.losses import cross_entropy
    from linvid.distill.recipe import Stage
    from linvid.distill.trainer import step_losses

    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(workspace / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(workspace / "teacher")
    torch.manual_seed(0)
    student = linvid.convert(teacher, "mamba2-hybrid-25").eval()
    apply_transv(student, "paper", init="transfer")
    for name, parameter in student.named_parameters():  # make TransV drop tokens visibly
        if ".transv." in name and "alpha" in name:
            parameter.data.fill_(1.0)
    dataset = VideoConversationDataset(
        read_conversations(workspace / "train.jsonl"),
        tokenizer,
        student.config.vision_config,
        num_frames=4,
        min_pixels=SIZE,
        max_pixels=SIZE,
    )
    batch = dataset.collate([dataset[0]])
    calls = []
    student.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("transv_prompt_length")),
        with_kwargs=True,
        prepend=True,  # before TransV's own hook, which takes the argument
    )
    stage = Stage.from_dict(
        {
            "name": "s",
            "trainable": [".*"],
            "losses": {"ce": 1.0},
            "learning_rate": 1e-3,
            "batch_size": 1,
            "steps": 1,
            "data": "test",
        }
    )
    accelerator = SimpleNamespace(unwrap_model=lambda model: model)
    with torch.no_grad():
        values = step_losses(stage, student, teacher, batch, accelerator, {}, dataset, transv=True)
    inputs = model_inputs(batch)
    labels = inputs.pop("labels")
    prompt_length = int((labels[0] != -100).nonzero()[0])
    assert calls == [prompt_length]
    with torch.no_grad():
        forced = student(**inputs, transv_prompt_length=prompt_length, use_cache=False).logits
        whole = student(**inputs, use_cache=False).logits
    assert not torch.allclose(forced, whole)  # the prompt length matters here
    torch.testing.assert_close(values["ce"], cross_entropy(forced, labels))
