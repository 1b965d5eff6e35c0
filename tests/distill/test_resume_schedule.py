"""Resuming in the middle of a stage, with several steps of warmup and cosine decay left: every
step after the resume takes the learning rate and loss of an uninterrupted run, and the run ends
with its weights.

The stage has 8 optimizer steps over 6 samples in batches of 2 (3 steps per epoch), 3 of them
linear warmup and 5 of cosine decay to 0.1 x the peak, and a second parameter group with its
own peak. One run is stopped after step 2 (inside the warmup, mid-epoch) by --max-steps; another
is interrupted inside step 7 (its loss computed, no update yet), 2 steps after its last
checkpoint, so steps 6 and 7 run twice. A resume that restores the weights and the optimizer but
not the scheduler starts its schedule again at step 0: the learning rates logged from the
resume on, and the weights from the second resumed step on, differ from the uninterrupted run.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from distill_workspace import write_workspace
from safetensors.torch import load_file

import linvid.distill.trainer as trainer
from linvid.cli import main

SIZE = 56 * 56
STEPS, WARMUP_RATIO, MINIMUM_RATIO = 8, 0.375, 0.1
PEAK, LAYER_ONE_PEAK = 1.0e-3, 3.0e-3
RECIPE = f"""
name: test_resume_schedule
student: rwkv6-all
stages:
  - name: mixers
    steps: {STEPS}
    batch_size: 2
    data: test
    trainable: ['\\.mixer\\.']
    losses: {{kl: 1.0, ce: 0.5}}
    learning_rate: {PEAK}
    parameter_groups:
      - {{pattern: '\\.layers\\.1\\.', learning_rate: {LAYER_ONE_PEAK}}}
    warmup_ratio: {WARMUP_RATIO}
    schedule: cosine
    min_learning_rate_ratio: {MINIMUM_RATIO}
    optimizer: {{betas: [0.9, 0.95], weight_decay: 0.1}}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_schedule")
    write_workspace(root, answer_choice=lambda index: index % 4 % 3)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def arguments(workspace, out, *extra):
    return [
        "distill", "--recipe", str(workspace / "recipe.yaml"),
        "--teacher", str(workspace / "teacher"), "--data", str(workspace / "train.jsonl"),
        "--out", str(out), "--num-frames", "4",
        "--min-pixels", str(SIZE), "--max-pixels", str(SIZE), *extra,
    ]  # fmt: skip


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def student_weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "student" / "model.linvid.safetensors"))


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """An uninterrupted run of the stage (no checkpoints)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(arguments(workspace, out)) == 0
    return out


def expected_learning_rate(step: int) -> float:
    """The default group's lr of optimizer step `step` (1-based), written out from the
    recipe's definition: linear warmup from 0 over ceil(ratio x steps) steps, then cosine from
    the peak to min_learning_rate_ratio x the peak at the end of the stage."""
    index, warmup = step - 1, math.ceil(WARMUP_RATIO * STEPS)
    if index < warmup:
        return PEAK * index / warmup
    progress = (index - warmup) / (STEPS - warmup)
    return PEAK * (MINIMUM_RATIO + (1 - MINIMUM_RATIO) * (1 + math.cos(math.pi * progress)) / 2)


def check_matches_reference(reference, out, resumed_after: int):
    """Every logged step of `out` has the reference run's step, lr and losses; the lr is the
    recipe's schedule; the final weights are the reference's."""
    expected, resumed = metrics(reference), metrics(out)
    assert [row["step"] for row in resumed] == list(range(1, STEPS + 1))
    assert [row["step"] for row in expected] == list(range(1, STEPS + 1))
    warmup = math.ceil(WARMUP_RATIO * STEPS)
    # Several steps are left, and the schedule at the resume differs from its start.
    assert resumed_after <= STEPS - 3
    assert expected_learning_rate(resumed_after + 1) != expected_learning_rate(1)
    for row, want in zip(resumed, expected, strict=True):
        step = row["step"]
        assert row["lr"] == pytest.approx(expected_learning_rate(step), rel=1e-12, abs=0), step
        assert row["lr"] == want["lr"], step
        for name in ("kl", "ce"):
            assert row[name] == pytest.approx(want[name], rel=1e-6, abs=1e-7), (step, name)
    resumed_steps = range(resumed_after + 1, STEPS + 1)
    phases = {"warmup" if step <= warmup else "cosine" for step in resumed_steps}
    assert phases == ({"warmup", "cosine"} if resumed_after < warmup else {"cosine"})
    one, two = student_weights(reference), student_weights(out)
    assert one.keys() == two.keys()
    trained = [name for name in one if ".mixer." in name]
    assert trained and any(".layers.1." in name for name in trained)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-7, msg=name)


def test_resume_inside_the_warmup_matches_every_step_of_an_uninterrupted_run(
    workspace, reference, tmp_path
):
    """Stopped after step 2 of 8 (--max-steps), in the warmup and mid-epoch, then resumed: steps
    3-8 (one of warmup, five of cosine decay) log the uninterrupted run's lr and losses, and the
    student ends with its weights (atol 1e-7)."""
    out = tmp_path / "stopped"
    first = arguments(workspace, out, "--checkpoint-every", "2")
    assert main([*first, "--max-steps", "2"]) == 0
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert (state["stage_step"], state["epoch"], state["batch_index"]) == (2, 0, 2)
    schedule = json.loads((out / "checkpoints" / "step-00000002" / "scheduler.json").read_text())
    assert schedule["last_epoch"] == 2
    assert [row["step"] for row in metrics(out)] == [1, 2]
    assert main([*first, "--resume"]) == 0
    check_matches_reference(reference, out, resumed_after=2)


def test_run_interrupted_inside_a_step_resumes_from_its_checkpoint_as_if_uninterrupted(
    workspace, reference, tmp_path, monkeypatch
):
    """Interrupted (KeyboardInterrupt) inside step 7, after its loss and before its update,
    with the last checkpoint at step 5: the resumed run drops the logged step 6, runs steps 6-8
    again in the cosine decay and matches the uninterrupted run's lr and losses at every step
    and its weights at the end (atol 1e-7)."""
    check_finite = trainer.check_finite

    def interrupt_in_step_seven(loss, values, stage, state, accelerator):
        check_finite(loss, values, stage, state, accelerator)
        if state["global_step"] + 1 == 7:
            raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    command = arguments(workspace, out, "--checkpoint-every", "5")
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "check_finite", interrupt_in_step_seven)
        assert main(command) == 130
    assert [path.name for path in (out / "checkpoints").iterdir()] == ["step-00000005"]
    assert [row["step"] for row in metrics(out)] == list(range(1, 7))
    assert not (out / "student").exists()
    assert main([*command, "--resume"]) == 0
    check_matches_reference(reference, out, resumed_after=5)
