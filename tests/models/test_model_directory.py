"""`check_model_directory`: what a local model directory must hold before linvid loads it."""

import json

import pytest

from linvid.models.directory import (
    TEACHER_MODEL_TYPES,
    check_model_directory,
    decoder_layer_count,
)

QWEN = {"model_type": "qwen2_5_vl", "text_config": {"num_hidden_layers": 3}, "vision_config": {}}


def model_directory(root, config=QWEN, files=("model.safetensors", "tokenizer.json")):
    root.mkdir(exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    for name in files:
        (root / name).write_bytes(b"x")
    return root


def test_a_complete_directory_passes_and_gives_its_config(tmp_path):
    directory = model_directory(tmp_path / "model")
    assert check_model_directory(directory, tokenizer=True) == QWEN
    assert decoder_layer_count(QWEN) == 3 and decoder_layer_count({"model_type": "x"}) is None
    sharded = model_directory(tmp_path / "sharded", files=("model.safetensors.index.json",))
    assert check_model_directory(sharded, "--teacher") == QWEN


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "--model {path} does not exist: expected a local model directory"),
        ("file", "--model {path} is a file, not a directory"),
        ("no config", "--model {path} has no config.json"),
        ("bad json", "--model {path}: config.json does not read as JSON"),
        ("text model", "--model {path} holds a 'qwen2' model (Qwen2ForCausalLM), without a"),
        ("no weights", "--model {path} has no weights (*.safetensors)"),
        ("pickle", "--model {path} holds pickle weights only (pytorch_model.bin)"),
        ("no tokenizer", "--model {path} has no tokenizer files (looked for tokenizer.json"),
    ],
)
def test_each_problem_is_one_message_naming_option_and_path(tmp_path, case, expected):
    path = tmp_path / "model"
    if case == "file":
        path.write_text("x")
    elif case == "no config":
        path.mkdir()
    elif case == "bad json":
        model_directory(path)
        (path / "config.json").write_text("{not json")
    elif case == "text model":
        model_directory(path, {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    elif case == "no weights":
        model_directory(path, files=("tokenizer.json",))
    elif case == "pickle":
        model_directory(path, files=("pytorch_model.bin", "tokenizer.json"))
    elif case == "no tokenizer":
        model_directory(path, files=("model.safetensors",))
    with pytest.raises(ValueError) as raised:
        check_model_directory(path, tokenizer=True)
    assert expected.format(path=path) in str(raised.value)


def test_a_student_is_refused_where_a_teacher_is_expected(tmp_path):
    directory = model_directory(tmp_path / "student", {"model_type": "linvid_qwen2_5_vl"})
    check_model_directory(directory)  # a video model linvid runs
    with pytest.raises(ValueError, match="holds a linvid student .* give its teacher's"):
        check_model_directory(directory, model_types=TEACHER_MODEL_TYPES)
