"""The pickle-free training state: an exact round trip of optimizer, scheduler, model and RNG."""

import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from linvid.distill.checkpoint import (
    CheckpointError,
    load_training_state,
    save_training_state,
    verify_checkpoint,
    write_manifest,
)


def trained(accelerator, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # a parameter without optimizer state
    groups = [
        {"params": list(model[0].parameters()), "weight_decay": 0.1},
        {"params": [model[1].weight], "weight_decay": 0.0, "lr": 2e-3},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(seed):
        model(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_round_trip_is_exact_and_pickle_free(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = trained(accelerator, 3)
    save_training_state(tmp_path, accelerator, model, optimizer, scheduler)
    assert {path.suffix for path in tmp_path.iterdir()} == {".safetensors", ".json"}
    draws = (torch.rand(3), random.random(), np.random.rand(2))
    expected = (optimizer.state_dict(), scheduler.state_dict(), model.state_dict())

    again, again_optimizer, again_scheduler = trained(accelerator, 2)
    load_training_state(tmp_path, accelerator, again, again_optimizer, again_scheduler)
    state, loaded = expected[0], again_optimizer.state_dict()
    assert loaded["param_groups"] == state["param_groups"]
    assert loaded["state"].keys() == state["state"].keys() == {0, 1, 2}
    for index, values in state["state"].items():
        for name, value in values.items():
            assert loaded["state"][index][name].dtype == value.dtype
            assert torch.equal(loaded["state"][index][name], value), (index, name)
    assert again_scheduler.state_dict() == expected[1]
    for name, value in expected[2].items():
        assert torch.equal(again.state_dict()[name], value), name
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1]
    assert np.array_equal(np.random.rand(2), draws[2])


def test_a_missing_file_is_named(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = trained(accelerator, 1)
    save_training_state(tmp_path, accelerator, model, optimizer, scheduler)
    (tmp_path / "scheduler.json").unlink()
    with pytest.raises(CheckpointError, match="scheduler.json is missing"):
        load_training_state(tmp_path, accelerator, model, optimizer, scheduler)


def test_a_truncated_or_changed_file_is_named(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = trained(accelerator, 1)
    save_training_state(tmp_path, accelerator, model, optimizer, scheduler)
    write_manifest(tmp_path)
    verify_checkpoint(tmp_path, ["model.safetensors", "optimizer.json"])

    schedule = tmp_path / "scheduler.json"
    original = schedule.read_text()
    schedule.write_text(original.replace('"last_epoch": 1', '"last_epoch": 2'))  # still JSON
    with pytest.raises(CheckpointError, match=f"{schedule} does not match the SHA-256"):
        verify_checkpoint(tmp_path)
    schedule.write_text(original)

    state = tmp_path / "optimizer.json"
    state.write_text(state.read_text()[:20])
    for check in (
        lambda: load_training_state(tmp_path, accelerator, model, optimizer, scheduler),
        lambda: verify_checkpoint((tmp_path / "manifest.json").unlink() or tmp_path),
    ):
        with pytest.raises(CheckpointError, match=f"{state} is not valid JSON"):
            check()
    state.unlink()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=f"{weights} does not load as safetensors"):
        verify_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=f"{state} is missing"):
        verify_checkpoint(tmp_path, ["optimizer.json"])
