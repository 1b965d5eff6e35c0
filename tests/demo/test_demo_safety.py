"""`linvid demo` follows the output rule (linvid/outputs.py): a Ctrl-C exits 130 with one line
and keeps the finished steps, which a rerun reuses; the steps' cache keys do not depend on how
--out is spelled; models load from local directories only; the report's files are replaced
whole."""

import json
import os
import re
import socket
import sys
from pathlib import Path

import matplotlib.figure
import pytest
from cli_runs import file_hashes, interrupt_when

from linvid.cli import main
from linvid.demo import pipeline
from linvid.demo.pipeline import DemoConfig, evaluate_and_time
from linvid.demo.report import write_report
from linvid.demo.students import InferenceSettings
from linvid.niah.teacher import build_teacher, build_tokenizer, load_teacher

# One student keeps the runs short (the quick demo with all four takes ~25 s).
QUICK = ["demo", "--quick", "--students", "mamba2-hybrid-25"]
STUDENT = "mamba2-hybrid-25"


def test_ctrl_c_keeps_finished_steps_and_a_rerun_goes_on_from_them(tmp_path, capsys):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "linvid.cli", *QUICK, "--out", str(out)]
    finished = {}

    def teacher_finished() -> bool:
        # The teacher's directory appears whole (renamed into place) after the data's.
        if not any(out.glob("teacher-*/fingerprint.json")):
            return False
        finished.update(file_hashes(*out.glob("data/train-*"), *out.glob("teacher-*")))
        return True

    code, _, stderr = interrupt_when(command, teacher_finished, tmp_path)
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert (
        "linvid demo: interrupted. Finished steps are kept; rerun the same command to go on "
        "from them." in stderr
    )
    assert file_hashes(*out.glob("data/train-*"), *out.glob("teacher-*")) == finished
    assert any(path.endswith("done.json") for path in finished)

    # The same command again (in this process: the CLI's start-up is slow) finishes.
    assert main([*QUICK, "--out", str(out)]) == 0
    rerun = capsys.readouterr()
    assert re.search(r"\[demo\] data: reusing .*/run/data/train-\w+", rerun.err)
    assert re.search(r"teacher: reusing .*/run/teacher-\w+", rerun.err)
    assert (out / "report.md").is_file() and f"report: {out / 'report.md'}" in rerun.out
    assert file_hashes(*out.glob("data/train-*"), *out.glob("teacher-*")) == finished


def test_the_spelling_of_out_does_not_change_the_cache_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*QUICK, "--out", "run"]) == 0  # relative
    capsys.readouterr()
    students = sorted((tmp_path / "run" / "students").iterdir())
    finished = file_hashes(tmp_path / "run" / "students", tmp_path / "run" / "evaluations")
    # The same run directory, spelled absolutely, from another working directory.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main([*QUICK, "--out", str(tmp_path / "run")]) == 0
    log = capsys.readouterr().err
    for step in ("data", f"distill {STUDENT}", "evaluate teacher", f"evaluate {STUDENT}"):
        assert re.search(rf"\[demo\] {step}: reusing {tmp_path}/run/", log), step
    assert f"teacher: reusing {tmp_path}/run/teacher-" in log
    assert sorted((tmp_path / "run" / "students").iterdir()) == students and len(students) == 1
    assert file_hashes(tmp_path / "run" / "students", tmp_path / "run" / "evaluations") == (
        finished
    )
    assert not (tmp_path / "elsewhere" / "run").exists()


class NetworkUsed(Exception):
    """Raised by any attempt to resolve or connect while a test forbids the network."""


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*arguments, **keywords):
        raise NetworkUsed(f"network access attempted: {arguments[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_missing_model_directories_are_named_and_never_looked_up_on_a_hub(
    tmp_path, monkeypatch, no_network
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    config = DemoConfig.quick()
    for directory in ("Qwen/Qwen2.5-VL-3B-Instruct", str(tmp_path / "runs" / "teacher-typo")):
        for name in ("teacher", STUDENT):
            with pytest.raises(FileNotFoundError, match=f"{re.escape(directory)} does not exist"):
                evaluate_and_time(name, Path(directory), InferenceSettings(), config, print)
        with pytest.raises(FileNotFoundError, match=f"{re.escape(directory)} does not exist"):
            load_teacher(directory)
    with pytest.raises(FileNotFoundError, match="empty holds no config.json"):
        load_teacher(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"not a directory")
    with pytest.raises(NotADirectoryError, match="weights.bin is a file"):
        load_teacher(tmp_path / "weights.bin")


def test_models_are_read_with_local_files_only(tmp_path, monkeypatch, no_network):
    tokenizer = build_tokenizer()
    teacher = build_teacher(tokenizer)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    model, loaded = pipeline.load_model("teacher", tmp_path / "teacher")
    assert not model.training and loaded.get_vocab() == tokenizer.get_vocab()
    model, _ = load_teacher(tmp_path / "teacher")
    assert not model.training
    # Every loader the demo calls is asked for local files only.
    import transformers

    import linvid

    calls = []

    class Loaded:
        def eval(self):
            return self

    def spy(what):
        def load(directory, **keywords):
            calls.append((what, keywords.get("local_files_only")))
            return Loaded()

        return load

    monkeypatch.setattr(linvid, "load", spy("student"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy("tokenizer"))
    monkeypatch.setattr(
        transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained", spy("teacher")
    )
    pipeline.load_model("teacher", tmp_path / "teacher")
    pipeline.load_model(STUDENT, tmp_path / "teacher")
    assert calls == [
        ("teacher", True),
        ("tokenizer", True),
        ("student", True),
        ("tokenizer", True),
    ]


# ---------------------------------------------------------------------------------------------
# The report


def report_parts(correct: bool) -> dict:
    """write_report's arguments for a teacher and one student (two lengths, three tasks)."""
    records = [
        {
            "task": task,
            "frames": frames,
            "depth": 0.3,
            "depth_bin": 1,
            "correct": correct,
            "single_try_correct": True,
        }
        for frames in (16, 32)
        for task in ("retrieval", "ordering", "counting")
    ]
    speed = [
        {
            "frames": frames,
            "llm_tokens": 4 * frames,
            "ttft_seconds": (0.01 if correct else 0.02) * frames,
            "ttft_vision_seconds": 0.02 * frames,
            "decode_tokens_per_second": 100.0 / frames,
            "cache_bytes": 1024 * frames,
        }
        for frames in (16, 32)
    ]
    return {
        "config": {"name": "quick", "seeds": {"all": 0}, "train_frames": 16, "depth_bins": 2},
        "machine": {"processor": "cpu", "cpu_count": 2, "torch": "2", "transformers": "5"},
        "steps": {"data": 1.0, "teacher": 2.0},
        "teacher": {"directory": "teacher-0"},
        "students": {STUDENT: {"paper": "002", "recipe": "demo_timeviper", "stages": []}},
        "results": {name: {"records": records, "speed": speed} for name in ("teacher", STUDENT)},
    }


def interrupted(write):
    """`write`, made to write part of what it was given and then raise KeyboardInterrupt."""

    def partly(target, data, *arguments, **keywords):
        write(target, data[: len(data) // 2], *arguments, **keywords)
        raise KeyboardInterrupt

    return partly


@pytest.mark.parametrize("stopped_in", ["a plot", "report.json", "report.md"])
def test_an_interrupted_report_leaves_no_file_half_written(tmp_path, monkeypatch, stopped_in):
    out = tmp_path / "run"
    out.mkdir()
    assert write_report(out, **report_parts(correct=True)) == out / "report.md"
    before = file_hashes(out)
    assert {Path(path).name for path in before} == {
        "accuracy.png",
        "heatmap.png",
        "speed.png",
        "report.json",
        "report.md",
    }
    if stopped_in == "a plot":
        original = matplotlib.figure.Figure.savefig

        def savefig(figure, target, *arguments, **keywords):
            if isinstance(target, str | os.PathLike):
                Path(target).write_bytes(b"half a PNG")
            else:
                target.write(b"half a PNG")
            raise KeyboardInterrupt

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    else:
        original = Path.write_text

        def write_text(path, text, *arguments, **keywords):
            if stopped_in in path.name:
                return interrupted(original)(path, text, *arguments, **keywords)
            return original(path, text, *arguments, **keywords)

        monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(KeyboardInterrupt):
        write_report(out, **report_parts(correct=False))
    monkeypatch.undo()
    after = file_hashes(out)
    assert set(after) == set(before)  # no temporary file left behind
    if stopped_in == "a plot":
        assert after == before  # every file is rendered before the first is replaced
    else:
        assert after[stopped_in] == before[stopped_in]
        assert json.loads((out / "report.json").read_text())["accuracy"]
    # Uninterrupted, the new report replaces every file.
    write_report(out, **report_parts(correct=False))
    replaced = file_hashes(out)
    assert set(replaced) == set(before)
    assert all(replaced[path] != before[path] for path in before)
