"""`linvid distill` under the output rule (linvid/outputs.py, issue #12): an earlier run is
never replaced without --overwrite, --resume needs a run, missing videos are found before the
first step, a damaged checkpoint is skipped for the previous one, model directories are read
locally only, and Ctrl-C keeps every finished checkpoint for --resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from cli_runs import default_ctrl_c, file_hashes, run_cli
from distill_workspace import write_workspace
from safetensors.torch import load_file, save_file

from linvid.cli import main
from linvid.distill.checkpoint import verify_checkpoint
from linvid.distill.trainer import sample_order

REPO = Path(__file__).resolve().parents[2]
SIZE = 56 * 56
STEPS = 4  # two stages of two steps
RECIPE = """
name: test_run_safety
student: rwkv6-all
defaults:
  steps: 2
  batch_size: 2
  data: test
  warmup_ratio: 0.25
  fail_on_bad_samples: {fail}
stages:
  - name: mixers
    trainable: ['\\.mixer\\.']
    losses: {{kl: 1.0, ce: 0.5}}
    learning_rate: 1.0e-3
  - name: mlp
    trainable: ['\\.layers\\.1\\.mlp\\.']
    losses: {{kl: 1.0}}
    learning_rate: 1.0e-3
"""
INTERRUPTED = (
    "linvid distill: interrupted. Finished checkpoints are kept; rerun the same command with "
    "--resume to go on."
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_safety")
    records = write_workspace(root)
    (root / "recipe.yaml").write_text(RECIPE.format(fail="true"))
    (root / "skip.yaml").write_text(RECIPE.format(fail="false"))
    missing = {**records[0], "video": "missing.mp4"}
    # The missing video on the last line (7): found today only when a step reaches it.
    with open(root / "missing_last.jsonl", "w") as file:
        file.writelines(json.dumps(record) + "\n" for record in [*records, missing])
    # The missing video where no step of the first epoch reads it: a batch of 2 takes 3
    # batches of the 7 samples, in this order, and leaves the last one out.
    never_read = sample_order(7, 0, 0, 0)[6]
    lines = [*records[:never_read], missing, *records[never_read:]]
    with open(root / "missing_unread.jsonl", "w") as file:
        file.writelines(json.dumps(record) + "\n" for record in lines)
    (root / "missing_unread.line").write_text(str(never_read + 1))
    return root


def arguments(workspace, out, *extra, recipe="recipe.yaml", data="train.jsonl"):
    return [
        "distill",
        "--recipe",
        str(workspace / recipe),
        "--teacher",
        str(workspace / "teacher"),
        "--plan",
        "rwkv6-all",
        "--data",
        str(workspace / data),
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


def cli(command, environment=None):
    """Run `python -m linvid.cli COMMAND...` in a subprocess: (exit code, stderr)."""
    result = run_cli(*command, timeout=300, env=environment)
    return result.returncode, result.stderr


def steps(out) -> list[int]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def assert_same_student(out, reference):
    expected = load_file(str(Path(reference) / "student" / "model.linvid.safetensors"))
    resumed = load_file(str(Path(out) / "student" / "model.linvid.safetensors"))
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """An uninterrupted run of the recipe."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(arguments(workspace, out)) == 0
    return out


@pytest.fixture(scope="module")
def stopped(workspace, tmp_path_factory):
    """A run stopped after step 3 of 4, with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    command = arguments(workspace, out, "--checkpoint-every", "1", "--keep-checkpoints", "3")
    assert main([*command, "--max-steps", "3"]) == 0
    return out


# --- case 1: a finished run is never replaced without --overwrite -------------------------


def test_a_finished_run_is_kept_without_overwrite(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(arguments(workspace, out)) == 0  # no checkpoints: only its student/
    before = file_hashes(out)
    code, error = cli(arguments(workspace, out))
    assert code == 2, error
    assert f"--out {out}" in error and str(out / "student") in error and "--overwrite" in error
    assert file_hashes(out) == before
    # --resume has nothing to go on from either.
    assert main(arguments(workspace, out, "--resume")) == 2
    error = capsys.readouterr().err
    assert "no checkpoint to resume from" in error and "--overwrite" in error
    # Its student is an input of the next run: that run must not write over it.
    command = arguments(workspace, out, "--overwrite")
    command[command.index("--plan") : command.index("--plan") + 2] = [
        "--student",
        str(out / "student"),
    ]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert f"would overwrite the input {out / 'student'}" in error
    assert file_hashes(out) == before


def test_out_is_never_the_teacher(workspace):
    teacher = workspace / "teacher"
    before = file_hashes(teacher)
    code, error = cli(arguments(workspace, teacher, "--overwrite"))
    assert code == 2, error
    assert f"--out {teacher} would overwrite the input {teacher}" in error
    assert file_hashes(teacher) == before


def test_overwrite_replaces_the_student_only_once_saved_whole(workspace, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    assert main(arguments(workspace, out)) == 0
    before = file_hashes(out / "student")
    # Interrupt the final save after the weights, before the tokenizer files.
    tokenizer_class = type(AutoTokenizer.from_pretrained(workspace / "teacher"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_class, "save_pretrained", interrupted)
        assert main(arguments(workspace, out, "--overwrite", "--max-steps", "1")) == 130
    assert file_hashes(out / "student") == before
    assert not [path.name for path in out.iterdir() if ".partial-" in path.name]
    assert main(arguments(workspace, out, "--overwrite", "--max-steps", "1")) == 0
    assert steps(out) == [1]
    after = file_hashes(out / "student")
    assert after.keys() == before.keys()
    weights = "model.linvid.safetensors"
    assert after[weights] != before[weights]  # one step, not four


# --- case 2: --resume needs a run ---------------------------------------------------------


def test_resume_needs_a_run_to_resume(workspace, tmp_path, capsys):
    typo = tmp_path / "no_such_run"
    code, error = cli(arguments(workspace, typo, "--resume"))
    assert code == 2, error
    assert f"--out {typo} does not exist" in error and "nothing to resume" in error
    assert not typo.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(arguments(workspace, empty, "--resume")) == 2
    error = capsys.readouterr().err
    assert f"--out {empty} is empty" in error and "nothing to resume" in error
    assert not any(empty.iterdir())


# --- case 3: every video file is checked before the first step ----------------------------


def test_a_missing_video_stops_the_run_before_any_step(workspace, tmp_path):
    out = tmp_path / "run"
    data = workspace / "missing_last.jsonl"
    code, error = cli(arguments(workspace, out, data=data.name))
    assert code == 2, error
    assert f"{data}:7: video {workspace / 'missing.mp4'} does not exist" in error
    assert "fail_on_bad_samples" in error and "stage 'mixers'" in error
    assert not out.exists()  # stopped before any model was loaded


def test_missing_videos_are_reported_up_front_when_skipped(workspace, tmp_path):
    out = tmp_path / "run"
    data = workspace / "missing_unread.jsonl"
    line = (workspace / "missing_unread.line").read_text()
    command = arguments(workspace, out, "--max-steps", "1", recipe="skip.yaml", data=data.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(command) == 0
    about = [str(warning.message) for warning in caught if "missing.mp4" in str(warning.message)]
    assert len(about) == 1, about  # one warning, though no step read the sample
    assert f"{data}:{line}: video {workspace / 'missing.mp4'} does not exist" in about[0]
    assert "'mixers', 'mlp'" in about[0]
    rows = [json.loads(text) for text in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped"] == 1


# --- case 4: a damaged checkpoint is skipped for the previous one -------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def poison(path: Path) -> None:
    """Rewrite a safetensors file with NaN in its first floating tensor (still valid)."""
    tensors = load_file(str(path))
    name = next(key for key, value in sorted(tensors.items()) if value.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata={"format": "pt"})


DAMAGES = {
    "truncated weights": ("model.safetensors", truncate, False),
    "truncated state": ("trainer_state.json", truncate, False),
    "NaN weights": ("model.safetensors", poison, False),
    "NaN weights, no manifest": ("model.safetensors", poison, True),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_skips_a_damaged_newest_checkpoint(stopped, reference, workspace, tmp_path, damage):
    name, spoil, drop_manifest = DAMAGES[damage]
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    newest = out / "checkpoints" / "step-00000003"
    spoil(newest / name)
    if drop_manifest:  # a checkpoint of an older linvid: verified file by file
        (newest / "manifest.json").unlink(missing_ok=True)
    damaged = file_hashes(newest)
    command = arguments(workspace, out, "--checkpoint-every", "1", "--keep-checkpoints", "3")
    with pytest.warns(UserWarning, match="skipping checkpoint step-00000003") as caught:
        assert main([*command, "--resume"]) == 0
    (message,) = [str(w.message) for w in caught if "skipping checkpoint" in str(w.message)]
    assert str(newest / name) in message
    assert f"resuming from {out / 'checkpoints' / 'step-00000002'}" in message
    assert file_hashes(out / "checkpoints" / "unusable-step-00000003") == damaged  # kept aside
    assert steps(out) == list(range(1, STEPS + 1))
    assert_same_student(out, reference)


def test_resume_without_a_usable_checkpoint_names_the_files(stopped, workspace, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    for checkpoint in (out / "checkpoints").iterdir():
        truncate(checkpoint / "trainer_state.json")
    before = file_hashes(out)
    assert main(arguments(workspace, out, "--resume")) == 2
    error = capsys.readouterr().err
    for step in (1, 2, 3):
        assert str(out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json") in error
    assert "linvid distill: error: cannot resume: no checkpoint in" in error
    assert file_hashes(out) == before


# --- case 5: model directories are read locally only --------------------------------------


def test_a_mistyped_teacher_is_named_without_asking_a_model_hub(workspace, tmp_path):
    typo = tmp_path / "techer"
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    command = arguments(workspace, tmp_path / "run", "--overwrite")
    command[command.index("--teacher") + 1] = str(typo)
    started = time.monotonic()
    code, error = cli(command, environment)
    assert code == 2, error
    assert f"--teacher {typo} does not exist" in error and "local" in error
    assert time.monotonic() - started < 60  # no hub retries
    assert not (tmp_path / "run").exists()


def test_a_teacher_without_its_tokenizer_is_named(workspace, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for path in (workspace / "teacher").iterdir():
        if not path.name.startswith("tokenizer"):
            shutil.copy(path, teacher / path.name)
    command = arguments(workspace, tmp_path / "run")
    command[command.index("--teacher") + 1] = str(teacher)
    assert main(command) == 2
    error = capsys.readouterr().err
    assert f"--teacher {teacher} has no tokenizer" in error
    assert not (tmp_path / "run").exists()


def test_models_are_read_with_local_files_only(workspace, tmp_path, monkeypatch):
    from transformers import (
        AutoModelForImageTextToText,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
    )

    import linvid

    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(workspace / "teacher")
    linvid.convert(teacher, "rwkv6-all").save_pretrained(tmp_path / "student")
    calls = []
    for cls in (Qwen2_5_VLForConditionalGeneration, AutoTokenizer, AutoModelForImageTextToText):
        original = cls.from_pretrained.__func__

        def spy(cls, *args, original=original, **kwargs):
            calls.append((cls.__name__, kwargs.get("local_files_only")))
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    command = arguments(workspace, tmp_path / "run", "--max-steps", "1")
    command[command.index("--plan") : command.index("--plan") + 2] = [
        "--student",
        str(tmp_path / "student"),
    ]
    assert main(command) == 0
    names = {name for name, _ in calls}
    assert {"Qwen2_5_VLForConditionalGeneration", "AutoTokenizer"} <= names
    assert "AutoModelForImageTextToText" in names  # the --student
    assert all(local is True for _, local in calls), calls


# --- case 6: Ctrl-C keeps every finished checkpoint ---------------------------------------


def test_an_interrupt_while_pruning_leaves_no_partial_checkpoint(
    workspace, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    command = arguments(workspace, out, "--checkpoint-every", "1", "--keep-checkpoints", "1")
    remove = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        """Delete one file of a whole checkpoint, then Ctrl-C (as a slow delete would)."""
        path = Path(path)
        if (path / "trainer_state.json").is_file() and (path / "model.safetensors").is_file():
            (path / "model.safetensors").unlink()
            raise KeyboardInterrupt
        return remove(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", interrupted)
        assert main(command) == 130
    assert INTERRUPTED in capsys.readouterr().err
    finished = sorted((out / "checkpoints").glob("step-*"))
    assert finished
    for checkpoint in finished:
        verify_checkpoint(checkpoint, ["model.safetensors", "trainer_state.json"])
    assert main([*command, "--resume"]) == 0
    assert steps(out) == list(range(1, STEPS + 1))
    assert [path.name for path in (out / "checkpoints").iterdir()] == [f"step-{STEPS:08d}"]
    assert_same_student(out, reference)


def test_ctrl_c_keeps_the_checkpoints_and_resume_finishes(workspace, reference, tmp_path):
    out = tmp_path / "run"
    command = arguments(workspace, out, "--checkpoint-every", "1")
    environment = {**os.environ, "LINVID_TEST_SLOW_STEP_SECONDS": "1.0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "linvid.cli", *command],
        cwd=REPO,
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_ctrl_c,
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-00000002").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    error = process.communicate(timeout=60)[1]
    assert process.returncode == 130, error[-3000:]
    assert error.rstrip().splitlines()[-1] == INTERRUPTED and "Traceback" not in error
    finished = sorted((out / "checkpoints").glob("step-*"))
    assert finished and not (out / "student").exists()
    for checkpoint in finished:
        verify_checkpoint(checkpoint, ["model.safetensors", "trainer_state.json"])
    assert main([*command, "--resume"]) == 0
    assert steps(out) == list(range(1, STEPS + 1))
    assert_same_student(out, reference)
