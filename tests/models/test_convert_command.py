"""`linvid convert` on a local checkpoint directory."""

import json
import subprocess
import sys

import pytest
import torch
from cli_runs import REPO, file_hashes
from cli_runs import run_cli as cli
from safetensors.torch import load_file

import linvid
from linvid.cli import main
from linvid.models.mixer_attention import MixerAttention
from linvid.models.qwen2_5_vl import LinvidQwen2_5_VLForConditionalGeneration


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


# --- the output rule and the plan options (issue #12) ------------------------------------
# These run the CLI in a subprocess, as a user does: the exit code and the one-line message
# are what is checked, and every byte of what was there before must still be there.


def cli_together(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Several `cli` runs side by side (each pays the interpreter's start-up once)."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "linvid.cli", *command],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    results = []
    for command, process in zip(commands, processes, strict=True):
        out, error = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, error))
    return results


def convert_arguments(teacher_dir, out) -> list[str]:
    return ["convert", "--model", str(teacher_dir), "--recipe", "rwkv6-all", "--out", str(out)]


@pytest.fixture
def teacher_dir(teacher, tmp_path):
    directory = tmp_path / "teacher"
    teacher.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


def test_convert_never_writes_over_its_teacher(teacher_dir, tmp_path):
    """Case 1: --out is the teacher, inside it or holding it: refused, even with --overwrite."""
    before = file_hashes(tmp_path)
    outs = (teacher_dir, teacher_dir / "student", tmp_path)
    results = cli_together(*([*convert_arguments(teacher_dir, out), "--overwrite"] for out in outs))
    for out, result in zip(outs, results, strict=True):
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"--out {out} would overwrite the input" in result.stderr
        assert "Traceback" not in result.stderr
    assert file_hashes(tmp_path) == before


def test_convert_refuses_a_non_empty_out_without_overwrite(teacher_dir, tmp_path):
    """Case 2: a non-empty --out is left byte for byte as it was; the message names --out
    and --overwrite."""
    out = tmp_path / "student"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "something else"}')
    (out / "model.safetensors").write_bytes(b"earlier weights")
    (out / "notes.txt").write_text("mine")
    before = file_hashes(tmp_path)
    result = cli(*convert_arguments(teacher_dir, out))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--out {out} exists and is not empty" in result.stderr
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert file_hashes(tmp_path) == before


def test_convert_overwrite_leaves_exactly_the_new_student(teacher_dir, tmp_path, capsys):
    """Case 2: with --overwrite, --out holds the new student and nothing of what was there
    (the student is built beside it and renamed into place: no partial directory is left)."""
    fresh, out = tmp_path / "fresh", tmp_path / "student"
    assert main(convert_arguments(teacher_dir, fresh)) == 0
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "something else"}')
    (out / "notes.txt").write_text("stale")
    (out / "tokenizer.json").write_text("stale tokenizer")
    assert main([*convert_arguments(teacher_dir, out), "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(file_hashes(out)) == sorted(file_hashes(fresh))
    assert (out / "config.json").read_text() == (fresh / "config.json").read_text()
    assert (
        load_file(out / "model.linvid.safetensors").keys()
        == load_file(fresh / "model.linvid.safetensors").keys()
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fresh", "student", "teacher"]
    assert isinstance(linvid.load(out), LinvidQwen2_5_VLForConditionalGeneration)


def test_interrupted_convert_leaves_out_as_it_was(teacher_dir, tmp_path, monkeypatch, capsys):
    """Case 2: Ctrl-C while the student is being written: exit 130, one line, --out intact
    and the partial directory removed."""
    out = tmp_path / "student"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "earlier"}')
    (out / "model.safetensors").write_bytes(b"earlier weights")
    before = file_hashes(tmp_path)
    saved = LinvidQwen2_5_VLForConditionalGeneration.save_pretrained

    def save_then_interrupt(model, directory, *arguments, **options):
        saved(model, directory, *arguments, **options)  # half of the job is on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(
        LinvidQwen2_5_VLForConditionalGeneration, "save_pretrained", save_then_interrupt
    )
    assert main([*convert_arguments(teacher_dir, out), "--overwrite"]) == 130
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1] == (
        "linvid convert: interrupted. Nothing was written; the --out directory is as it was."
    )
    assert file_hashes(tmp_path) == before


def test_convert_refuses_layers_with_fraction(teacher_dir, tmp_path):
    """Case 4: --fraction 0.5 --layers 0 used to drop --layers without a word."""
    out = tmp_path / "student"
    result = cli(*convert_arguments(teacher_dir, out), "--fraction", "0.5", "--layers", "0")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--layers" in result.stderr and "--fraction" in result.stderr
    assert "not both" in result.stderr and not out.exists()


def test_convert_names_layers_when_they_are_not_layer_indices(teacher_dir, tmp_path):
    """Case 5: --layers a,b said "invalid literal for int()"; an index past the model's depth
    is named with the depth."""
    out = tmp_path / "student"
    words, outside = cli_together(
        [*convert_arguments(teacher_dir, out), "--layers", "a,b"],
        [*convert_arguments(teacher_dir, out), "--layers", "0,7"],
    )
    for result in (words, outside):
        assert result.returncode == 2, result.stderr[-2000:]
        assert "--layers" in result.stderr and "comma-separated decoder layer indices" in (
            result.stderr
        )
        assert "invalid literal" not in result.stderr and "Traceback" not in result.stderr
    assert "'a,b'" in words.stderr and "from 0 to 1" in words.stderr
    assert "[7]" in outside.stderr and "2 decoder layers" in outside.stderr
    assert not out.exists()


# --- reproducibility and the ablation switches (issue #14) --------------------------------


def test_converting_twice_writes_the_same_student_and_seed_changes_it(teacher_dir, tmp_path):
    """In process (main), so the three runs share the caller's random state: the seed alone
    decides the drawn parameters (Mamba-2's A_log, dt_bias, dt projection here)."""
    outs = {name: tmp_path / name for name in ("first", "second", "other")}
    for name, out in outs.items():
        seed = ["--seed", "7"] if name == "other" else []
        torch.manual_seed(len(name))  # a different caller state each time
        arguments = ["convert", "--model", str(teacher_dir), "--recipe", "mamba2-hybrid-25"]
        assert main([*arguments, "--layers", "0,1", "--out", str(out), *seed]) == 0
    weights = {name: linvid.load(out).state_dict() for name, out in outs.items()}
    first, second, other = weights["first"], weights["second"], weights["other"]
    assert all(torch.equal(first[name], second[name]) for name in first)
    drawn = [name for name in first if not torch.equal(first[name], other[name])]
    assert drawn and all(".mixer." in name for name in drawn)


def test_ablation_switches_reach_the_saved_plan(teacher_dir, tmp_path):
    out = tmp_path / "static"
    arguments = ["convert", "--model", str(teacher_dir), "--recipe", "qwen-rwkv-vl-50"]
    assert main([*arguments, "--gate", "static", "--init", "random", "--out", str(out)]) == 0
    plan = json.loads((out / "config.json").read_text())["linvid_plan"]
    assert (plan["gate"], plan["init"]) == ("static", "random")
    student = linvid.load(out)
    mixer = student.model.language_model.layers[1].self_attn.mixer
    assert not hasattr(mixer.cross_attention, "dynamic_gate")
    out = tmp_path / "flex"
    arguments = ["convert", "--model", str(teacher_dir), "--recipe", "linmu"]
    assert main([*arguments, "--branches", "flex", "--out", str(out)]) == 0
    assert linvid.load(out).model.language_model.layers[0].self_attn.mixer.swin is None


def test_bad_seeds_and_misplaced_switches_are_refused_before_loading(teacher_dir, tmp_path):
    runs = cli_together(
        [*convert_arguments(teacher_dir, tmp_path / "a"), "--seed", "-1"],
        [*convert_arguments(teacher_dir, tmp_path / "b"), "--gate", "static"],
        [*convert_arguments(teacher_dir, tmp_path / "c"), "--branches", "swin"],
    )
    assert [run.returncode for run in runs] == [2, 2, 2]
    assert "seed must be a non-negative integer, got -1" in runs[0].stderr
    assert "gate 'static' applies to the rwkv6_hybrid mixer" in runs[1].stderr
    assert "branches 'swin' applies to the mmate mixer only" in runs[2].stderr
    assert not any((tmp_path / name).exists() for name in "abc")
