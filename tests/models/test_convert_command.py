"""`linvid convert` on a local checkpoint directory."""

import json

import pytest
import torch

import linvid
from linvid.cli import main
from linvid.models.mixer_attention import MixerAttention


def test_convert_command_writes_a_loadable_student(teacher, video_inputs, tmp_path, capsys):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    teacher.save_pretrained(teacher_dir)
    (teacher_dir / "tokenizer_config.json").write_text("{}")
    code = main(
        [
            "convert",
            "--model",
            str(teacher_dir),
            "--recipe",
            "rwkv6-all",
            "--layers",
            "1",
            "--out",
            str(student_dir),
        ]
    )
    assert code == 0 and "converted" in capsys.readouterr().out
    assert (student_dir / "tokenizer_config.json").is_file()
    plan = json.loads((student_dir / "config.json").read_text())["linvid_plan"]
    assert plan["mixer"] == "rwkv6" and plan["layers"] == [1]
    student = linvid.load(student_dir)
    layers = student.model.language_model.layers
    assert [isinstance(layer.self_attn, MixerAttention) for layer in layers] == [False, True]
    # weight reuse: the teacher's W_Q of layer 1 is one of the student mixer's weights
    query = teacher.model.language_model.layers[1].self_attn.q_proj.weight
    mixer_weights = layers[1].self_attn.mixer.parameters()
    assert any(w.shape == query.shape and torch.equal(w, query) for w in mixer_weights)
    with torch.no_grad():
        assert torch.isfinite(student(**video_inputs, use_cache=False).logits).all()


def test_convert_command_reports_a_missing_checkpoint(tmp_path, capsys):
    code = main(["convert", "--model", str(tmp_path), "--recipe", "linmu", "--out", str(tmp_path)])
    assert code == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["nope"])
def test_convert_command_rejects_unknown_presets(tmp_path, capsys, preset):
    assert main(["convert", "--model", str(tmp_path), "--recipe", preset, "--out", "x"]) == 2
    assert "unknown preset" in capsys.readouterr().err
