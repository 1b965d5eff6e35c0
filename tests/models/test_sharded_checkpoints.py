"""Checkpoints as users have them (issue #14): a bfloat16 teacher in safetensors shards with
model.safetensors.index.json under Qwen's own key names converts (`linvid convert`), the
student is written in shards of --max-shard-size in the "linvid" variant
(model.linvid-0000K-of-0000N.safetensors + model.safetensors.index.linvid.json) and in the
teacher's dtype unless --dtype says otherwise, and loads back through linvid.load and
AutoModelForImageTextToText with transformers' dtype / device_map, while plain Qwen2.5-VL
loading still refuses it. Tiny sizes; the same at 7B widths: test_seven_b_dimensions.py."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.cli import main
from linvid.models.convert import convert_checkpoint
from linvid.models.qwen2_5_vl import (
    LinvidQwen2_5_VLForConditionalGeneration,
    StudentWeightsError,
)
from linvid.models.tiny import tiny_qwen2_5_vl_config

SHARD_SIZE = "60KB"  # the tiny teacher is ~300 KB in bfloat16: several shards
PRESET = "qwen-rwkv-vl-25"  # layer 1 of 2 becomes RWKV-6 + cross-attention


def saved_dtypes(directory) -> dict[str, str]:
    """{weight name: safetensors dtype ("BF16", "F32", ...)} over every shard of a directory."""
    dtypes = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            dtypes.update({name: weights.get_slice(name).get_dtype() for name in weights.keys()})
    return dtypes


def shard_names(directory, index_name) -> list[str]:
    """The shard files an index names; checks that each exists."""
    index = json.loads((directory / index_name).read_text())
    names = sorted(set(index["weight_map"].values()))
    assert all((directory / name).is_file() for name in names), names
    return names


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """teacher/ (bfloat16, sharded, Qwen's key names) and student/ converted from it with
    SHARD_SIZE shards; the in-memory teacher it was saved from."""
    root = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
    teacher = teacher.to(torch.bfloat16).eval()
    teacher.save_pretrained(root / "teacher", max_shard_size=SHARD_SIZE)
    convert_checkpoint(
        str(root / "teacher"), PRESET, str(root / "student"), max_shard_size=SHARD_SIZE
    )
    return root, teacher


def test_the_teacher_checkpoint_is_laid_out_like_qwens(checkpoints):
    """What Qwen/Qwen2.5-VL-7B-Instruct ships: shards, model.safetensors.index.json, the
    original key names (transformers 5 renames them on load), dtype in config.json."""
    root, _ = checkpoints
    teacher = root / "teacher"
    assert len(shard_names(teacher, "model.safetensors.index.json")) >= 2
    names = set(saved_dtypes(teacher))
    assert {"model.layers.0.self_attn.q_proj.weight", "visual.blocks.0.attn.qkv.weight"} < names
    assert {"lm_head.weight", "model.embed_tokens.weight", "visual.merger.mlp.0.weight"} < names
    assert not any("language_model" in name or name.startswith("model.visual") for name in names)
    assert json.loads((teacher / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_sharded_teacher_converts_into_a_sharded_student(checkpoints):
    root, teacher = checkpoints
    student_directory = root / "student"
    shards = shard_names(student_directory, "model.safetensors.index.linvid.json")
    assert len(shards) >= 2
    assert all(name.startswith("model.linvid-") for name in shards), shards
    assert not (student_directory / "model.safetensors.index.json").exists()
    assert not list(student_directory.glob("model-*"))
    # The student that linvid convert saved is the one linvid.convert makes in memory.
    expected = linvid.convert(teacher, PRESET).state_dict()
    for loader in (linvid.load, AutoModelForImageTextToText.from_pretrained):
        loaded = loader(student_directory, local_files_only=True)
        assert isinstance(loaded, LinvidQwen2_5_VLForConditionalGeneration)
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), name


def test_a_bfloat16_teacher_gives_a_bfloat16_student(checkpoints):
    """transformers 5 loads in the saved dtype (dtype="auto"): the new mixer parameters are
    built in the teacher's dtype too (A_log, decays and gates included), and the student's
    config.json says so, so it loads back in bfloat16."""
    root, _ = checkpoints
    student_directory = root / "student"
    assert set(saved_dtypes(student_directory).values()) == {"BF16"}
    assert json.loads((student_directory / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = linvid.load(student_directory)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}


def test_load_takes_transformers_dtype_and_device_map(checkpoints):
    root, _ = checkpoints
    saved = linvid.load(root / "student")
    loaded = linvid.load(root / "student", dtype=torch.float32, device_map="cpu")
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float32}
    assert {parameter.device.type for parameter in loaded.parameters()} == {"cpu"}
    for (name, tensor), reference in zip(
        loaded.state_dict().items(), saved.state_dict().values(), strict=True
    ):
        assert torch.equal(tensor, reference.float()), name


def test_convert_dtype_option_overrides_the_teachers_dtype(checkpoints, tmp_path, capsys):
    root, _ = checkpoints
    out = tmp_path / "student"
    code = main(
        [
            "convert",
            "--model",
            str(root / "teacher"),
            "--recipe",
            "linmu",
            "--out",
            str(out),
            "--dtype",
            "float32",
            "--max-shard-size",
            "100KB",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert set(saved_dtypes(out).values()) == {"F32"}
    assert len(shard_names(out, "model.safetensors.index.linvid.json")) >= 2
    loaded = linvid.load(out)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float32}


def test_the_default_shard_size_keeps_a_small_student_in_one_file(checkpoints, tmp_path):
    root, _ = checkpoints
    convert_checkpoint(str(root / "teacher"), PRESET, str(tmp_path / "student"))
    files = sorted(path.name for path in (tmp_path / "student").glob("model*"))
    assert files == ["model.linvid.safetensors"]


def test_a_loader_that_does_not_know_the_plan_refuses_a_sharded_student(checkpoints):
    """As for one-file students (test_student_loading): without the "linvid" variant there is
    no model.safetensors nor model.safetensors.index.json to load."""
    root, _ = checkpoints
    with pytest.raises(OSError, match="model.safetensors"):
        Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "student", local_files_only=True)


def test_a_sharded_student_whose_plan_was_changed_is_refused(checkpoints, tmp_path):
    root, _ = checkpoints
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in (root / "student").iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    config = json.loads((changed / "config.json").read_text())
    config["linvid_plan"].update({"mixer": "mamba2"})
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(StudentWeightsError, match="does not match its weights"):
        linvid.load(changed)


@pytest.mark.parametrize("value", ["5GiB", "0MB", "big"])
def test_a_bad_shard_size_stops_before_the_teacher_is_loaded(checkpoints, tmp_path, capsys, value):
    root, _ = checkpoints
    out = tmp_path / "student"
    arguments = ["--model", str(root / "teacher"), "--recipe", PRESET, "--out", str(out)]
    assert main(["convert", *arguments, "--max-shard-size", value]) == 2
    error = capsys.readouterr().err
    assert '--max-shard-size expects a positive size such as "5GB"' in error
    assert repr(value) in error
    assert not out.exists()


def test_a_bad_dtype_is_refused(checkpoints, tmp_path, capsys):
    root, _ = checkpoints
    out = tmp_path / "student"
    arguments = ["--model", str(root / "teacher"), "--recipe", PRESET, "--out", str(out)]
    with pytest.raises(SystemExit) as stopped:
        main(["convert", *arguments, "--dtype", "int8"])
    assert stopped.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--dtype must be one of auto, bfloat16, float16"):
        convert_checkpoint(str(root / "teacher"), PRESET, str(out), dtype="half")
    assert not out.exists()
