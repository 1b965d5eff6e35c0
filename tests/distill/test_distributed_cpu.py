"""Sharded training on CPU: configs/accelerate/fsdp2_cpu_2proc.yaml (the FSDP2 settings of
fsdp2_8gpu.yaml) on two gloo processes ends with the weights of one process, writes the same
pickle-free checkpoints and resumes from them; what a sharded run cannot train is refused.

accelerate 1.16 turns an FSDP config into FSDP only on GPUs: on CPU (ACCELERATE_USE_CPU=true)
its state becomes MULTI_CPU and the FSDP settings are dropped (accelerate/state.py, the
FSDP branch is under `distributed_type in [MULTI_GPU, ...]`). LAUNCHER lifts that one device
gate, then runs `linvid` unchanged: the sharding (fully_shard of each decoder layer and
vision block), the gathers and the checkpoints are accelerate's and linvid's own code."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from test_trainer import arguments, free_port, student_weights, workspace  # noqa: F401

from linvid.cli import main
from linvid.distill.recipe import Recipe
from linvid.distill.trainer import check_sharded_run

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "accelerate" / "fsdp2_cpu_2proc.yaml"
LAUNCHER = """
import runpy

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

original = AcceleratorState.__init__


def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = init
runpy.run_module("linvid.cli", run_name="__main__")
"""
PICKLES = {".bin", ".pt", ".pth", ".pkl", ".pickle"}


def launch_fsdp(root, out, launcher, *extra):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIG),
        "--main_process_port",
        str(free_port()),
        str(launcher),
        *arguments(root, out, *extra),
    ]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_fsdp2_on_two_processes_matches_one_and_resumes_from_its_checkpoints(
    workspace,  # noqa: F811
    tmp_path,
):
    single = tmp_path / "single"
    assert main(arguments(workspace, single, "--checkpoint-every", "5")) == 0
    launcher = tmp_path / "fsdp_on_cpu.py"
    launcher.write_text(LAUNCHER)
    sharded = tmp_path / "fsdp2"
    # Stop in the second stage with a checkpoint, then resume: the checkpoint's weights and
    # optimizer state were gathered from the shards and are scattered back into them.
    launch_fsdp(workspace, sharded, launcher, "--checkpoint-every", "5", "--max-steps", "5")
    checkpoint = sharded / "checkpoints" / "step-00000005"
    reference = single / "checkpoints" / "step-00000005"
    names = sorted(path.name for path in checkpoint.iterdir())
    # linvid's own format, one RNG pair per process; no pickles (accelerate's FSDP save_state
    # would write optimizer_0/*.distcp and a pickled scheduler.bin).
    assert names == sorted(
        [*(p.name for p in reference.iterdir()), "rng_1.json", "rng_1.safetensors"]
    )
    assert not [path for path in sharded.rglob("*") if path.suffix in PICKLES]
    assert json.loads((checkpoint / "optimizer.json").read_text()) == json.loads(
        (reference / "optimizer.json").read_text()
    )
    launch_fsdp(workspace, sharded, launcher, "--checkpoint-every", "5", "--resume")
    rows = [json.loads(line) for line in (sharded / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert all(row["processes"] == 2 for row in rows)
    assert not [path for path in sharded.rglob("*") if path.suffix in PICKLES]
    # The gradient of a batch of 2 is summed in another order when each process takes one
    # sample and FSDP2 reduce-scatters (as with DDP): 8 AdamW steps differ by about 5e-7.
    one, two = student_weights(single), student_weights(sharded)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)


def test_fsdp_config_on_cpu_without_a_process_group_is_refused(workspace, tmp_path, capsys):  # noqa: F811
    """What a torchrun-started process sees when accelerate formed no process group (an FSDP
    or DeepSpeed config on CPU without ACCELERATE_USE_CPU): refused before any model loads."""
    os.environ["WORLD_SIZE"] = "2"
    try:
        assert main(arguments(workspace, tmp_path / "alone")) == 2
    finally:
        del os.environ["WORLD_SIZE"]
    error = capsys.readouterr().err
    assert "WORLD_SIZE=2" in error and "ACCELERATE_USE_CPU=true" in error
    assert not (tmp_path / "alone" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("kind", "stage", "allowed"),
    [
        (DistributedType.FSDP, {"losses": {"kl": 1.0}}, True),
        (DistributedType.FSDP, {"losses": {"kl": 1.0, "hidden": 1.0}}, False),
        (DistributedType.FSDP, {"losses": {"ce": 1.0}, "tokens_per_frame": 4}, False),
        (
            DistributedType.FSDP,
            {"losses": {"kl": 1.0}, "lora": {"rank": 2, "alpha": 4, "target_modules": "mlp"}},
            False,
        ),
        (DistributedType.MULTI_CPU, {"losses": {"kl": 1.0, "hidden": 1.0}}, True),
    ],
)
def test_sharded_runs_refuse_what_runs_layers_outside_the_forward(kind, stage, allowed):
    recipe = {
        "name": "sharded",
        "defaults": {"steps": 1, "batch_size": 2, "learning_rate": 1.0e-3, "data": "test"},
        "stages": [{"name": "one", "trainable": ["\\.mixer\\."], **stage}],
    }
    accelerator = SimpleNamespace(distributed_type=kind, state=None)
    if allowed:
        check_sharded_run(Recipe.from_dict(recipe), accelerator)
    else:
        with pytest.raises(
            ValueError, match="stage 'one' .* cannot train; launch it data-parallel"
        ):
            check_sharded_run(Recipe.from_dict(recipe), accelerator)
