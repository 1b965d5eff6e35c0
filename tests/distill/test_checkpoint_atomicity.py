"""A checkpoint directory under its final name `step-N` is complete from the moment it exists.

The trainer writes each checkpoint into a temporary directory, records every file in its
manifest and only then renames it to checkpoints/step-N. These tests look at the folder without
relying on timing: an audit hook (`sys.addaudithook`) runs before every file-system operation
Python performs in the run (open, mkdir, rename/replace, scandir, remove, ...) and, whenever a
step-N folder exists that it has not seen in this state, checks that it reads back whole. So a
step-N folder is checked in the state it is in at the first operation after it appears (after
the rename, or after its mkdir and first file when a writer fills it in place), and again after
every change. A run interrupted while a checkpoint is being written leaves no step-N of it.
"""

import json
import sys
import threading
from pathlib import Path

import pytest
from distill_workspace import write_workspace

import linvid.distill.trainer as trainer
from linvid.cli import main
from linvid.distill.checkpoint import (
    MANIFEST,
    MODEL_FILE,
    OPTIMIZER_JSON,
    OPTIMIZER_TENSORS,
    SCHEDULER_JSON,
    read_json,
    rng_files,
    verify_checkpoint,
)

SIZE = 56 * 56
STEPS = 4
RECIPE = f"""
name: test_checkpoint_atomicity
student: rwkv6-all
stages:
  - name: mixers
    steps: {STEPS}
    batch_size: 2
    data: test
    trainable: ['\\.mixer\\.']
    losses: {{kl: 1.0}}
    learning_rate: 1.0e-3
"""
# What a one-process checkpoint holds (trainer module docstring), manifest.json included.
REQUIRED = (
    MANIFEST,
    MODEL_FILE,
    OPTIMIZER_TENSORS,
    OPTIMIZER_JSON,
    SCHEDULER_JSON,
    *rng_files(0),
    "student_trainable.safetensors",
    trainer.STATE_FILE,
)
# Audit events of file-system operations (https://docs.python.org/3/library/audit_events.html).
EVENTS = {
    "open",
    "os.mkdir",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.scandir",
    "os.listdir",
    "os.truncate",
    "os.utime",
    "os.link",
    "os.symlink",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copyfile",
}
_WATCHERS: list = []  # the active CheckpointWatcher(s); the audit hook is process-wide
_HOOKED: list = []


def _dispatch(event, args):
    if event in EVENTS:
        for watcher in list(_WATCHERS):
            watcher.observe(event, args)


class CheckpointWatcher:
    """Before every audited file-system operation, check each `folder`/step-* directory whose
    listing (names, sizes, modification times) changed since it was last checked: every file
    of a checkpoint is there, the manifest lists exactly the folder's other files and
    `verify_checkpoint` passes (sizes, SHA-256, JSON and safetensors read back, finite), and
    its trainer_state.json holds the step of its name. Problems are collected, not raised
    (an exception would break the run's own operation)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.checked: dict[str, tuple] = {}  # step-N -> listing when last checked
        self.problems: list[str] = []
        self.local = threading.local()

    def __enter__(self):
        if not _HOOKED:
            sys.addaudithook(_dispatch)
            _HOOKED.append(True)
        _WATCHERS.append(self)
        return self

    def __exit__(self, *exception):
        _WATCHERS.remove(self)
        self.check("end of run")

    def observe(self, event, args):
        if getattr(self.local, "busy", False):  # the checks' own file operations
            return
        self.local.busy = True
        try:
            self.check(f"{event}{tuple(map(str, args))[:2]}")
        except Exception as error:  # recorded, the run goes on
            self.problems.append(f"before {event}: watcher failed: {error!r}")
        finally:
            self.local.busy = False

    def check(self, moment: str):
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.iterdir()):
            if not (path.name.startswith("step-") and path.is_dir()):
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file())
            listing = tuple(
                (p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                for p in files
            )
            if self.checked.get(path.name) == listing:
                continue
            self.checked[path.name] = listing
            try:
                verify_checkpoint(path, REQUIRED)
                listed = set(read_json(path / MANIFEST)["files"])
                present = {name for name, _, _ in listing} - {MANIFEST}
                assert listed == present, f"manifest lists {sorted(listed)}, holds {present}"
                step = read_json(path / trainer.STATE_FILE)["global_step"]
                assert path.name == f"step-{step:08d}", f"holds step {step}"
            except Exception as error:  # CheckpointError, AssertionError, ...
                names = [name for name, _, _ in listing]
                self.problems.append(f"{path.name} before {moment}, holding {names}: {error}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomicity")
    write_workspace(root)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def arguments(workspace, out, *extra):
    return [
        "distill", "--recipe", str(workspace / "recipe.yaml"),
        "--teacher", str(workspace / "teacher"), "--data", str(workspace / "train.jsonl"),
        "--out", str(out), "--num-frames", "4",
        "--min-pixels", str(SIZE), "--max-pixels", str(SIZE), *extra,
    ]  # fmt: skip


def test_every_step_folder_is_complete_whenever_it_exists(workspace, tmp_path):
    """A checkpoint every step, the newest 2 kept: each of step-1 ... step-4 is checked by the
    watcher while it exists (so none escapes it), and every state any of them is seen in
    holds all its files, listed in its manifest and verified (`verify_checkpoint`)."""
    out = tmp_path / "run"
    command = arguments(workspace, out, "--checkpoint-every", "1", "--keep-checkpoints", "2")
    with CheckpointWatcher(out / trainer.CHECKPOINTS) as watcher:
        assert main(command) == 0
    assert watcher.problems == []
    assert sorted(watcher.checked) == [f"step-{step:08d}" for step in range(1, STEPS + 1)]
    kept = sorted(path.name for path in (out / trainer.CHECKPOINTS).iterdir())
    assert kept == ["step-00000003", "step-00000004"]


def test_an_interrupt_while_a_checkpoint_is_written_leaves_no_step_folder_of_it(
    workspace, tmp_path, monkeypatch, recwarn
):
    """Ctrl-C right after the training state of step 3 is written (before the trainer's own
    files and the manifest): there is no step-3 folder, step-2 is whole, and --resume goes on
    from step 2 without finding an unusable checkpoint to set aside."""
    save_training_state = trainer.save_training_state

    def interrupted_at_step_three(directory, accelerator, model, optimizer, scheduler):
        save_training_state(directory, accelerator, model, optimizer, scheduler)
        if json.loads(Path(directory, SCHEDULER_JSON).read_text())["last_epoch"] == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    command = arguments(workspace, out, "--checkpoint-every", "1")
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_training_state", interrupted_at_step_three)
        assert main(command) == 130
    folder = out / trainer.CHECKPOINTS
    steps = sorted(path.name for path in folder.glob("step-*"))
    assert steps == ["step-00000001", "step-00000002"]
    verify_checkpoint(folder / "step-00000002", REQUIRED)
    with CheckpointWatcher(folder) as watcher:
        assert main([*command, "--resume"]) == 0
    assert watcher.problems == []
    assert not [str(warning.message) for warning in recwarn if "skipping" in str(warning.message)]
    assert not list(folder.glob(f"{trainer.UNUSABLE}*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
