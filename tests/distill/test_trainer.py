"""The distillation loop end to end on a tiny teacher: a two-stage run, two processes against
one, kill and resume, a NaN stop and the CLI's errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distill_workspace import write_workspace
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.cli import main

REPO = Path(__file__).resolve().parents[2]
SIZE = 56 * 56
RECIPE = """
name: test_two_stages
student: rwkv6-all
defaults:
  steps: 4
  batch_size: 2
  data: test
  warmup_ratio: 0.25
  optimizer: {{betas: [0.9, 0.95], weight_decay: 0.1}}
stages:
  - name: mixers
    trainable: ['\\.mixer\\.']
    losses: {{kl: 1.0, ce: 0.5}}
    learning_rate: {lr}
  - name: mlp
    trainable: ['\\.layers\\.1\\.mlp\\.']
    losses: {{kl: 1.0, ce: 0.0}}
    learning_rate: {lr}
"""

HIDDEN_LORA = """
name: test_hidden_lora
defaults: {steps: 2, batch_size: 2, data: test, fail_on_bad_samples: false}
stages:
  - name: align
    trainable: ['\\.mixer\\.']
    losses: {kl: 1.0, hidden: 1.0}
    # The F.mse_loss scale: eq. 6's sum over channels makes steps 64x larger at lr 1e-3, and
    # the two-process run's summation order then moves weights by more than 1e-5.
    hidden_reduction: mean
    learning_rate: 1.0e-3
  - name: lora
    trainable: ['\\.mixer\\.']
    lora: {rank: 2, alpha: 4, target_modules: '.*\\.mlp\\.(gate_proj|up_proj|down_proj)'}
    losses: {kl: 0.5, sequence: 0.5, ce: 0.5}
    learning_rate: 1.0e-3
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    # Answers of different lengths: padding and per-process token counts differ.
    records = write_workspace(root, answer_choice=lambda index: index % 4 % 3)
    for name, rate in (("recipe.yaml", "1.0e-3"), ("nan.yaml", "1.0e+30")):
        (root / name).write_text(RECIPE.format(lr=rate))
    (root / "hidden_lora.yaml").write_text(HIDDEN_LORA)
    accumulated = RECIPE.format(lr="1.0e-3").replace(
        "batch_size: 2", "batch_size: 2\n  gradient_accumulation: 2"
    )
    (root / "accumulate.yaml").write_text(accumulated)
    missing = {**records[0], "video": "missing.mp4"}
    with open(root / "with_missing.jsonl", "w") as file:
        file.writelines(json.dumps(record) + "\n" for record in [missing, *records])
    return root


def arguments(workspace, out, *extra, recipe="recipe.yaml"):
    return [
        "distill",
        "--recipe",
        str(workspace / recipe),
        "--teacher",
        str(workspace / "teacher"),
        "--plan",
        "rwkv6-all",
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


def student_weights(out):
    return load_file(str(Path(out) / "student" / "model.linvid.safetensors"))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_run_trains_the_stage_parameters_and_logs(workspace, tmp_path):
    out = tmp_path / "run"
    assert main(arguments(workspace, out, "--checkpoint-every", "3")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert [row["stage"] for row in rows] == ["mixers"] * 4 + ["mlp"] * 4
    assert all(row["kl"] >= 0 and "lr" in row and row["samples_per_second"] > 0 for row in rows)
    assert all("ce" in row for row in rows[:4]) and "ce" not in rows[4]
    assert (out / "loss_mixers.png").stat().st_size > 0 and (out / "loss_mlp.png").exists()
    # Checkpoints at steps 3 and 6; the newest two kept, no temporary directory left.
    names = sorted(path.name for path in (out / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000006"]
    state = json.loads((out / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert (state["stage_index"], state["stage_step"], state["global_step"]) == (1, 2, 6)

    student = linvid.load(str(out / "student"))
    start = linvid.convert(
        Qwen2_5_VLForConditionalGeneration.from_pretrained(workspace / "teacher"), "rwkv6-all"
    ).state_dict()
    for name, value in student.state_dict().items():
        trained = ".mixer." in name or ".layers.1.mlp." in name
        assert torch.equal(value, start[name]) != trained, name


@pytest.mark.parametrize(
    ("recipe", "tolerance"), [("recipe.yaml", 1e-6), ("hidden_lora.yaml", 1e-5)]
)
def test_two_processes_match_one(workspace, tmp_path, recipe, tolerance):
    single = tmp_path / "single"
    assert main(arguments(workspace, single, recipe=recipe)) == 0
    double = tmp_path / "double"
    # accelerate 1.15 starts MULTI_CPU configs (configs/accelerate/cpu_2proc.yaml) through
    # mpirun only, so on one machine without MPI it runs a single process; its torchrun
    # launcher (--multi_gpu) with ACCELERATE_USE_CPU gives the 2-process gloo run.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        "1",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "linvid.cli",
        *arguments(workspace, double, recipe=recipe),
    ]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row["processes"] == 2 for row in rows)
    one, two = student_weights(single), student_weights(double)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=tolerance, msg=name)


def test_killed_run_resumes_to_the_same_weights(workspace, tmp_path):
    reference = tmp_path / "reference"
    assert main(arguments(workspace, reference)) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "linvid.cli", *arguments(workspace, out)]
    command += ["--checkpoint-every", "1", "--keep-checkpoints", "2"]
    environment = {**os.environ, "LINVID_TEST_SLOW_STEP_SECONDS": "1.0"}
    process = subprocess.Popen(command, cwd=REPO, env=environment, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-00000003").exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "student").exists()
    assert main(arguments(workspace, out, "--resume", "--checkpoint-every", "1")) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    expected, resumed = student_weights(reference), student_weights(out)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-7, msg=name)


def test_nan_loss_stops_with_the_stage_and_step(workspace, tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(arguments(workspace, out, "--checkpoint-every", "1", recipe="nan.yaml"))
    message = capsys.readouterr().err
    assert code == 2 and "not finite" in message and "stage 'mixers', step" in message
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints and not list((out / "checkpoints").glob("tmp-*"))
    assert str(checkpoints[-1]) in message
    load_file(str(checkpoints[-1] / "student_trainable.safetensors"))
    assert not (out / "student").exists()


def test_checkpoints_hold_no_pickles_and_refuse_a_missing_file(workspace, tmp_path, capsys):
    out = tmp_path / "pickle_free"
    command = arguments(workspace, out, "--checkpoint-every", "1")
    assert main([*command, "--max-steps", "5"]) == 0  # the last checkpoint is in stage "mlp"
    newest = out / "checkpoints" / "step-00000005"
    assert sorted(path.name for path in newest.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng_0.json",
        "rng_0.safetensors",
        "scheduler.json",
        "student_trainable.safetensors",
        "trainer_state.json",
    ]
    for checkpoint in (out / "checkpoints").iterdir():
        assert not [p for p in checkpoint.iterdir() if p.suffix in {".bin", ".pkl", ".pt"}]
    optimizer = json.loads((newest / "optimizer.json").read_text())
    assert optimizer["param_groups"] and all("betas" in g for g in optimizer["param_groups"])
    for checkpoint in (out / "checkpoints").iterdir():  # none left to fall back to
        (checkpoint / "optimizer.safetensors").unlink()
    assert main([*command, "--resume"]) == 2
    message = capsys.readouterr().err
    assert f"{newest / 'optimizer.safetensors'} is missing" in message


def test_clear_errors(workspace, tmp_path, capsys):
    missing = arguments(workspace, tmp_path / "a")
    missing[missing.index("--data") + 1] = str(tmp_path / "nowhere.jsonl")
    assert main(missing) == 2
    assert "data file not found" in capsys.readouterr().err
    unknown = arguments(workspace, tmp_path / "b")
    unknown[unknown.index("--recipe") + 1] = "no_such_recipe"
    assert main(unknown) == 2
    assert "unknown recipe 'no_such_recipe'" in capsys.readouterr().err


def test_hidden_sequence_and_lora_stages_and_skipped_samples(workspace, tmp_path):
    out = tmp_path / "lora"
    command = arguments(workspace, out, recipe="hidden_lora.yaml")
    command[command.index("--data") + 1] = str(workspace / "with_missing.jsonl")
    with pytest.warns(UserWarning, match="missing.mp4"):
        assert main(command) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["align"] * 2 + ["lora"] * 2
    assert all(row["hidden"] >= 0 for row in rows[:2])
    assert all(row["sequence"] > 0 and row["ce"] > 0 for row in rows[2:])
    assert rows[-1]["skipped"] == 1
    student = linvid.load(str(out / "student"))  # LoRA merged back into a plain student
    assert not any("lora_" in name for name, _ in student.named_parameters())
    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(workspace / "teacher")
    before = teacher.state_dict()
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(student.state_dict()[name], before[name])


def decode_records(out):
    """The teacher's stored greedy answers of a run (one store: one stage uses "sequence")."""
    (store,) = (Path(out) / "teacher_decodes").iterdir()
    lines = (store / "rank-0.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def test_resume_inside_a_lora_stage_matches_an_uninterrupted_run(workspace, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert main(arguments(workspace, reference, recipe="hidden_lora.yaml")) == 0
    out = tmp_path / "stopped"
    first = arguments(workspace, out, "--checkpoint-every", "1", recipe="hidden_lora.yaml")
    assert main([*first, "--max-steps", "3"]) == 0  # stops after step 1 of the LoRA stage
    state = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert (state["stage_index"], state["stage_step"]) == (1, 1)
    assert main(first) == 2  # a fresh run must not mix with the old checkpoints
    assert "pass --resume" in capsys.readouterr().err
    decoded_before = decode_records(out)
    assert decoded_before  # step 3 (the LoRA stage's first) decoded its samples to disk
    assert main([*first, "--resume"]) == 0
    decoded = decode_records(out)
    assert decoded[: len(decoded_before)] == decoded_before
    indices = [record["index"] for record in decoded]
    assert len(indices) == len(set(indices)) > len(decoded_before)  # none decoded twice
    expected, resumed = student_weights(reference), student_weights(out)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-7, msg=name)


def test_gradient_accumulation_takes_the_same_steps(workspace, tmp_path):
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    assert main(arguments(workspace, whole)) == 0
    assert main(arguments(workspace, accumulated, recipe="accumulate.yaml")) == 0
    one, two = student_weights(whole), student_weights(accumulated)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)


def test_stage_data_names_resolve_to_their_files(workspace, tmp_path):
    from linvid.cli import data_arguments
    from linvid.distill.recipe import Stage
    from linvid.distill.trainer import RunOptions, make_dataset, stage_data_files

    train = str(workspace / "train.jsonl")  # six samples
    small = tmp_path / "small.jsonl"
    small.write_text(
        "".join(open(train).readlines()[:2]).replace('"video": "', f'"video": "{workspace}/')
    )
    default, by_name = data_arguments([train, f"captions={small}"])
    assert (default, by_name) == (train, {"captions": str(small)})
    options = RunOptions(teacher="t", data=default, data_by_name=by_name, out="o")

    def stage(data):
        return Stage.from_dict(
            {
                "name": "s",
                "trainable": [".*"],
                "losses": {"ce": 1.0},
                "learning_rate": 1e-3,
                "batch_size": 1,
                "steps": 1,
                "data": data,
                "fail_on_bad_samples": False,
            }
        )

    assert stage_data_files(stage("captions"), options) == [str(small)]
    assert stage_data_files(stage("other"), options) == [train]  # the default
    assert stage_data_files(stage("captions+qa"), options) == [str(small), train]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workspace / "teacher")
    config = Qwen2_5_VLForConditionalGeneration.config_class.from_pretrained(workspace / "teacher")
    assert len(make_dataset(options, stage("captions+qa"), tokenizer, config)) == 2 + 6
    named_only = RunOptions(teacher="t", data=None, data_by_name=by_name, out="o")
    with pytest.raises(ValueError, match="--data qa=FILE.jsonl"):
        stage_data_files(stage("captions+qa"), named_only)
    with pytest.raises(ValueError, match="two default files"):
        data_arguments([train, str(small)])
    with pytest.raises(ValueError, match="names 'captions' twice"):
        data_arguments([f"captions={small}", f"captions={train}"])


def test_cli_names_a_stage_whose_data_has_no_file(workspace, tmp_path, capsys):
    command = arguments(workspace, tmp_path / "run")
    command[command.index("--data") + 1] = f"captions={workspace / 'train.jsonl'}"
    assert main(command) != 0
    error = capsys.readouterr().err
    assert "stage 'mixers' reads data 'test'" in error and "--data test=FILE.jsonl" in error


def test_vision_feature_cache_changes_nothing_but_the_work(workspace, tmp_path, monkeypatch):
    """Both stages freeze the vision tower and share the teacher's: the run decodes each of
    the 6 videos once and reads the tower's outputs from disk after that, and ends with the
    weights of a run that decodes and encodes every sample (2 stages x 4 steps x 2)."""
    import linvid.distill.data as data
    from linvid.distill.data import VisionFeatureCache

    decoded = []
    load_video = data.load_video
    monkeypatch.setattr(
        data, "load_video", lambda *a, **k: decoded.append(a) or load_video(*a, **k)
    )
    cached, plain = tmp_path / "cached", tmp_path / "plain"
    features = tmp_path / "features"
    assert main(arguments(workspace, cached, "--feature-cache", str(features))) == 0
    assert len(decoded) == 6
    assert main(arguments(workspace, plain, "--no-feature-cache")) == 0
    assert len(decoded) - 6 >= 16  # (accelerate's loader also reads one batch ahead)
    (folder,) = features.iterdir()
    assert len(VisionFeatureCache(folder)) == 6
    assert not (plain / "vision_features").exists()
    one, two = student_weights(plain), student_weights(cached)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)
