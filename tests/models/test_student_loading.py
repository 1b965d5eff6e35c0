"""A saved student loads with exactly its own weights (issue #12, case 3).

A student's structure comes from the plan in its config.json, its weights from the checkpoint.
A plan changed after saving (another mixer, another layer list) used to load with freshly
initialised mixers: `ask` answered and `distill --student` trained, and only transformers'
MISSING / UNEXPECTED table said so. Now every loader of a student directory (linvid.load,
AutoModelForImageTextToText.from_pretrained, `linvid ask`, `linvid distill --student`) refuses
it with one error naming a few of the weights and their count."""

import json
import shutil

import pytest
import torch
from cli_runs import run_cli as cli
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.models.plan import ConversionPlan
from linvid.models.qwen2_5_vl import (
    LinvidQwen2_5_VLForConditionalGeneration,
    StudentWeightsError,
    check_student_weights,
)
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.tokenizer import build_word_tokenizer, token_ids
from linvid.video.io import write_video

QUESTION = "what is here"
RECIPE = """
name: changed_plan
student: rwkv6-all
defaults:
  steps: 1
  batch_size: 1
  data: test
stages:
  - name: mixers
    trainable: ['\\.mixer\\.']
    losses: {ce: 1.0}
    learning_rate: 1.0e-3
"""
CHANGES = {
    "mixer": {"mixer": "mamba2"},  # another mixer on the same layer
    "layers": {"layers": [0]},  # the same mixer on another layer
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """teacher/, student/ (layer 1 an RWKV-6 mixer) and one changed-plan copy of the student
    per CHANGES entry (changed-mixer/, changed-layers/), each with its tokenizer; a video, a
    conversations JSONL and a recipe for distill."""
    root = tmp_path_factory.mktemp("student_loading")
    tokenizer = build_word_tokenizer([QUESTION, "a red ball"])
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(
        tiny_qwen2_5_vl_config(token_ids=token_ids(tokenizer))
    ).eval()
    teacher.save_pretrained(root / "teacher")
    student = linvid.convert(teacher, ConversionPlan(mixer="rwkv6", layers=(1,)))
    student.save_pretrained(root / "student")
    for directory in ("teacher", "student"):
        tokenizer.save_pretrained(root / directory)
    for name, change in CHANGES.items():
        changed = root / f"changed-{name}"
        shutil.copytree(root / "student", changed)
        config = json.loads((changed / "config.json").read_text())
        config["linvid_plan"].update(change)
        (changed / "config.json").write_text(json.dumps(config))
    frames = torch.randint(0, 256, (4, 3, 56, 56), generator=torch.Generator().manual_seed(0))
    write_video(root / "clip.mp4", frames.to(torch.uint8), fps=4)
    record = {
        "video": "clip.mp4",
        "conversations": [
            {"from": "human", "value": f"<video>\n{QUESTION}"},
            {"from": "gpt", "value": "a red ball"},
        ],
    }
    (root / "train.jsonl").write_text(json.dumps(record) + "\n")
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def assert_names_the_weights(message: str, directory) -> None:
    assert str(directory) in message and "does not match its weights" in message
    assert "weights missing from the checkpoint" in message
    assert "model.language_model.layers." in message and "more)" in message
    assert "linvid_plan" in message


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_linvid_load_refuses_a_student_whose_plan_was_changed(workspace, change, capfd):
    directory = workspace / f"changed-{change}"
    with pytest.raises(StudentWeightsError) as raised:
        linvid.load(directory)
    assert_names_the_weights(str(raised.value), directory)
    assert isinstance(raised.value, ValueError)  # the CLI prints it as one line, exit 2
    assert "LOAD REPORT" not in capfd.readouterr().err  # the error replaces the table


def test_the_auto_class_refuses_a_student_whose_plan_was_changed(workspace):
    directory = workspace / "changed-mixer"
    with pytest.raises(StudentWeightsError) as raised:
        AutoModelForImageTextToText.from_pretrained(directory)
    assert_names_the_weights(str(raised.value), directory)
    with pytest.raises(StudentWeightsError):
        LinvidQwen2_5_VLForConditionalGeneration.from_pretrained(directory)


def test_a_caller_asking_for_the_loading_info_gets_it_instead(workspace):
    model, info = AutoModelForImageTextToText.from_pretrained(
        workspace / "changed-layers", output_loading_info=True
    )
    assert isinstance(model, LinvidQwen2_5_VLForConditionalGeneration)
    assert any(".layers.0.self_attn.mixer." in key for key in info["missing_keys"])
    assert any(".layers.1.self_attn.mixer." in key for key in info["unexpected_keys"])


def test_a_saved_student_loads_with_every_weight(workspace, tmp_path, capfd):
    """The strict check leaves a whole student (and a plain teacher) as it was: saved again,
    the loaded student writes the same tensors."""
    linvid.load(workspace / "student").save_pretrained(tmp_path)
    saved = load_file(workspace / "student" / "model.linvid.safetensors")
    again = load_file(tmp_path / "model.linvid.safetensors")
    assert again.keys() == saved.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)
    teacher = linvid.load(workspace / "teacher")
    assert type(teacher) is Qwen2_5_VLForConditionalGeneration
    assert "LOAD REPORT" not in capfd.readouterr().err


def test_check_student_weights_names_a_few_weights_and_counts():
    missing = [f"layers.{index}.mixer.weight" for index in range(5)]
    with pytest.raises(StudentWeightsError) as raised:
        check_student_weights("somewhere", missing=missing, mismatched=[("head", (2,), (3,))])
    message = str(raised.value)
    assert "5 weights missing from the checkpoint" in message and "(2 more)" in message
    assert "layers.0.mixer.weight" in message and "layers.4.mixer.weight" not in message
    assert "1 weights of another shape (head)" in message
    check_student_weights("somewhere")  # nothing wrong: no error


def test_ask_refuses_a_student_whose_plan_was_changed(workspace):
    directory = workspace / "changed-mixer"
    result = cli(
        *("ask", str(workspace / "clip.mp4"), QUESTION, "--model", str(directory)),
        *("--min-pixels", "3136", "--max-pixels", "3136", "--max-new-tokens", "2"),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "LOAD REPORT" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "linvid ask: error:" in line]
    assert_names_the_weights(line, directory)
    assert result.stdout == ""  # no answer from freshly initialised mixers


def test_distill_refuses_a_student_whose_plan_was_changed(workspace, tmp_path):
    """It used to train the freshly initialised mixers and exit 0."""
    directory = workspace / "changed-mixer"
    result = cli(
        *("distill", "--recipe", str(workspace / "recipe.yaml")),
        *("--teacher", str(workspace / "teacher"), "--student", str(directory)),
        *("--data", str(workspace / "train.jsonl"), "--out", str(tmp_path / "run")),
        *("--num-frames", "4", "--min-pixels", "3136", "--max-pixels", "3136"),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "LOAD REPORT" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "linvid distill: error:" in line]
    assert_names_the_weights(line, directory)
    assert not (tmp_path / "run" / "student").exists()


def test_a_loader_that_does_not_know_the_plan_is_refused(workspace):
    """Issue #13: a student's weights are the "linvid" variant of the checkpoint layout, so
    plain Qwen2.5-VL loading (what lmms-eval's built-in qwen2_5_vl model does) stops with an
    error instead of loading the converted layers as freshly initialised attention."""
    student = workspace / "student"
    assert (student / "model.linvid.safetensors").is_file()
    assert not (student / "model.safetensors").exists()
    with pytest.raises(OSError, match="model.safetensors"):
        Qwen2_5_VLForConditionalGeneration.from_pretrained(student, local_files_only=True)
    assert isinstance(linvid.load(student), LinvidQwen2_5_VLForConditionalGeneration)


def test_a_student_saved_before_the_variant_layout_still_loads(workspace, tmp_path):
    """A directory with plain model.safetensors (students saved before issue #13) loads with
    the same weights, and is saved again in the variant layout."""
    old = tmp_path / "old"
    shutil.copytree(workspace / "student", old)
    (old / "model.linvid.safetensors").rename(old / "model.safetensors")
    loaded = linvid.load(old)
    expected = load_file(workspace / "student" / "model.linvid.safetensors")
    for name, tensor in loaded.state_dict().items():
        if name in expected:
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.linvid.safetensors").is_file()
