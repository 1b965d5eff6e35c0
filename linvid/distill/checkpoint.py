"""Pickle-free training state of a distillation checkpoint (model, optimizer, scheduler, RNG).

Single-process and plain data-parallel runs (accelerate distributed types NO, MULTI_CPU,
MULTI_GPU) write linvid's own format; nothing is ever unpickled on load:
  model.safetensors              the whole (unwrapped) student, LoRA adapters included
                                 (safetensors.torch.save_model: shared tensors stored once)
  optimizer.safetensors          every tensor of the torch optimizer's state_dict()["state"],
                                 keyed "state.<param_index>.<name>"
  optimizer.json                 param_groups (hyperparameters and param indices) and, per
                                 param index, its tensor names and its non-tensor entries
  scheduler.json                 the LambdaLR state_dict() (lr_lambdas stored as None)
  scaler.json                    the GradScaler state_dict(), only with fp16 mixed precision
  rng_<rank>.safetensors         torch CPU RNG state and CUDA RNG states, one file per process
  rng_<rank>.json                Python `random` and numpy RNG states, accelerate's step counter
  manifest.json                  every other file's size and SHA-256 (`write_manifest`, written
                                 last, inside the temporary directory before it is renamed)

Before a run resumes from a checkpoint, `verify_checkpoint` reads every file back: the manifest
matches, every JSON file parses, every safetensors header and tensor loads and every floating
tensor is finite; what fails names the file. A truncated or bit-flipped checkpoint is thus
found before any step (the trainer then falls back to the previous one).

FSDP2 runs (accelerate distributed type FSDP, fsdp_version 2) write the same files: every
process takes part in gathering the full model and optimizer state
(torch.distributed.checkpoint.state_dict, full_state_dict=True), the main process writes them,
and on load every process reads the full files and keeps its own shards. The optimizer's
parameter indices are the order of the parameters in its param_groups, as in the plain path,
so a checkpoint resumes under another process count or without FSDP.

DeepSpeed and FSDP1 shard model and optimizer their own way: for them the checkpoint is
accelerate's own `save_state` format (which includes pickles) and is read back with
`load_state`.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
SCALER_JSON = "scaler.json"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be resumed from (a file missing or inconsistent)."""


def uses_own_format(accelerator) -> bool:
    """Whether this run's checkpoints use linvid's pickle-free format (else accelerate's)."""
    from accelerate.utils import DistributedType

    own = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    return accelerator.distributed_type in own or accelerator.is_fsdp2


def full_model_state(accelerator, model) -> dict[str, torch.Tensor] | None:
    """The whole student's state_dict on the CPU, {name: tensor}, on the main process (None on
    the others). Under FSDP2 every process must call it: the shards are gathered."""
    if accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)  # collective
        return state if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        return None
    return {
        name: value.detach().cpu().contiguous()
        for name, value in accelerator.unwrap_model(model).state_dict().items()
    }


def _parameter_names(model, optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in param_groups order (the index torch's
    Optimizer.state_dict gives it)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _full_optimizer_state(accelerator, model, optimizer) -> dict | None:
    """The torch optimizer's state_dict with parameter indices as keys, unsharded; None on
    processes other than the main one under FSDP2 (every process must call it there)."""
    inner = _torch_optimizer(optimizer)
    if not accelerator.is_fsdp2:
        return inner.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_optimizer_state_dict(model, inner, options=options)  # collective, keyed by name
    if not accelerator.is_main_process:
        return None
    index = {name: position for position, name in enumerate(_parameter_names(model, inner))}
    groups = [
        {**group, "params": [index[name] for name in group["params"]]}
        for group in full["param_groups"]
    ]
    return {"state": {index[name]: v for name, v in full["state"].items()}, "param_groups": groups}


def rng_files(rank: int) -> tuple[str, str]:
    return f"rng_{rank}.safetensors", f"rng_{rank}.json"


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _torch_scheduler(scheduler):
    """The torch scheduler inside accelerate's AcceleratedScheduler (or itself)."""
    return getattr(scheduler, "scheduler", scheduler)


def _json_value(value, where: str):
    if isinstance(value, tuple | list):
        return [_json_value(item, where) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_value(item, where) for key, item in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{where}: cannot store {type(value).__name__} {value!r} as JSON")


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1))


def read_json(path: Path):
    """The JSON value in `path`; CheckpointError naming the file when it does not parse."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}); the file is truncated or corrupt"
        ) from None


def _load_tensors(path: Path) -> dict:
    """Every tensor of a safetensors file; CheckpointError naming the file when it does not
    load (a truncated file, a damaged header)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # SafetensorError derives from Exception only
        raise CheckpointError(
            f"{path} does not load as safetensors ({type(error).__name__}: {error}); the file "
            "is truncated or corrupt"
        ) from None


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of every file under `directory` in directory/manifest.json.
    Call it last, when every process has written its files and before the directory is renamed
    into place, so that the manifest describes the checkpoint as it was saved."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            name = path.relative_to(directory).as_posix()
            files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    _write_json(directory / MANIFEST, {"version": 1, "files": files})


def required_files(accelerator, processes: int | None = None) -> list[str]:
    """The files a checkpoint in linvid's own format must hold to resume `processes`
    processes (default: this run's), besides the trainer's own."""
    names = [MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_JSON]
    for rank in range(accelerator.num_processes if processes is None else processes):
        names += rng_files(rank)
    if accelerator.scaler is not None:
        names.append(SCALER_JSON)
    return names


def verify_checkpoint(directory: Path, required: tuple[str, ...] | list[str] = ()) -> None:
    """Check that a checkpoint reads back whole before anything is loaded from it: every name
    in `required` is a file; the manifest, when there is one (checkpoints of older linvid
    versions have none), parses and matches each listed file's size and SHA-256; every JSON
    file parses; every safetensors file's header and tensors load, and every floating tensor
    is finite. Raises CheckpointError naming the file and what is wrong with it."""
    from safetensors import safe_open

    directory = Path(directory)
    for name in required:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name} is missing")
    manifest = directory / MANIFEST
    if manifest.is_file():
        listed = read_json(manifest)
        if not isinstance(listed, dict) or not isinstance(listed.get("files"), dict):
            raise CheckpointError(f"{manifest} does not list the checkpoint's files")
        for name, expected in sorted(listed["files"].items()):
            path = directory / name
            if not isinstance(expected, dict):
                raise CheckpointError(f"{manifest} lists {name!r} without its size and SHA-256")
            if not path.is_file():
                raise CheckpointError(f"{path} is missing (listed in {manifest})")
            size = path.stat().st_size
            if size != expected.get("bytes"):
                raise CheckpointError(
                    f"{path} has {size} bytes, {expected.get('bytes')} were saved "
                    f"({MANIFEST}); the file is truncated or was changed"
                )
            if file_sha256(path) != expected.get("sha256"):
                raise CheckpointError(
                    f"{path} does not match the SHA-256 recorded when it was saved "
                    f"({MANIFEST}); the file is corrupt or was changed"
                )
    for path in sorted(directory.rglob("*.json")):
        read_json(path)
    for path in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as file:
                names = list(file.keys())
                for name in names:
                    tensor = file.get_tensor(name)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        raise CheckpointError(
                            f"{path} holds non-finite values (NaN or inf) in tensor {name!r}"
                        )
        except CheckpointError:
            raise
        except Exception as error:  # SafetensorError derives from Exception only
            raise CheckpointError(
                f"{path} does not load as safetensors ({type(error).__name__}: {error}); the "
                "file is truncated or corrupt"
            ) from None


def save_training_state(directory: Path, accelerator, model, optimizer, scheduler) -> None:
    """Write the state needed to resume into `directory` (every process calls this)."""
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    if not uses_own_format(accelerator):
        accelerator.save_state(str(directory))
        return
    gathered = full_model_state(accelerator, model) if accelerator.is_fsdp2 else None
    full = _full_optimizer_state(accelerator, model, optimizer)
    if accelerator.is_main_process:
        if gathered is not None:
            save_file(gathered, str(directory / MODEL_FILE))
        else:
            save_model(accelerator.unwrap_model(model), str(directory / MODEL_FILE))
        tensors, entries = {}, {}
        for index, values in full["state"].items():
            entry = {"tensors": [], "values": {}}
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
                    entry["tensors"].append(name)
                else:
                    entry["values"][name] = _json_value(value, f"optimizer state {index}.{name}")
            entries[str(index)] = entry
        save_file(tensors, str(directory / OPTIMIZER_TENSORS))
        groups = _json_value(full["param_groups"], "optimizer param_groups")
        _write_json(directory / OPTIMIZER_JSON, {"param_groups": groups, "state": entries})
        schedule = _json_value(_torch_scheduler(scheduler).state_dict(), "scheduler state")
        _write_json(directory / SCHEDULER_JSON, schedule)
        if accelerator.scaler is not None:
            scaler = _json_value(accelerator.scaler.state_dict(), "gradient scaler state")
            _write_json(directory / SCALER_JSON, scaler)
    tensors_file, json_file = rng_files(accelerator.process_index)
    generators = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            generators[f"cuda.{device}"] = state
    save_file(generators, str(directory / tensors_file))
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    _write_json(
        directory / json_file,
        {
            "python": [version, list(python_state), gauss],
            "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
            "accelerator_step": accelerator.step,
        },
    )


def load_training_state(directory: Path, accelerator, model, optimizer, scheduler) -> None:
    """Restore what `save_training_state` wrote; a missing, truncated or corrupt file raises
    CheckpointError naming it."""
    from safetensors.torch import load_model

    directory = Path(directory)
    if not uses_own_format(accelerator):
        accelerator.load_state(str(directory))
        return
    required = [MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_JSON]
    required += rng_files(accelerator.process_index)
    if accelerator.scaler is not None:
        required.append(SCALER_JSON)
    for name in required:
        if not (directory / name).is_file():
            raise CheckpointError(
                f"checkpoint {directory} cannot be resumed: {name} is missing (checkpoints "
                "written by FSDP/DeepSpeed runs or by older linvid versions hold "
                "accelerate's save_state files instead)"
            )

    try:
        if accelerator.is_fsdp2:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            # Every process reads the whole file and keeps its own shards.
            full = _load_tensors(directory / MODEL_FILE)
            options = StateDictOptions(full_state_dict=True, strict=True)
            set_model_state_dict(model, full, options=options)
        else:
            load_model(accelerator.unwrap_model(model), str(directory / MODEL_FILE), strict=True)
    except RuntimeError as error:  # keys or shapes of another model
        raise CheckpointError(
            f"{directory / MODEL_FILE} does not fit this run's student ({error})"
        ) from None
    except Exception as error:  # SafetensorError derives from Exception only
        raise CheckpointError(
            f"{directory / MODEL_FILE} does not load as safetensors ({type(error).__name__}: "
            f"{error}); the file is truncated or corrupt"
        ) from None

    inner = _torch_optimizer(optimizer)
    saved = read_json(directory / OPTIMIZER_JSON)
    tensors = _load_tensors(directory / OPTIMIZER_TENSORS)
    state = {}
    for index, entry in saved["state"].items():
        values = dict(entry["values"])
        for name in entry["tensors"]:
            key = f"state.{index}.{name}"
            if key not in tensors:
                raise CheckpointError(f"{directory / OPTIMIZER_TENSORS} has no tensor {key!r}")
            values[name] = tensors[key]
        state[int(index)] = values
    if len(saved["param_groups"]) != len(inner.param_groups):
        raise CheckpointError(
            f"{directory / OPTIMIZER_JSON} holds {len(saved['param_groups'])} parameter "
            f"groups, the optimizer has {len(inner.param_groups)}"
        )
    groups = []
    for stored, live in zip(saved["param_groups"], inner.param_groups, strict=True):
        # JSON has no tuples: give back tuples (e.g. AdamW's betas) where the optimizer has them.
        groups.append(
            {
                key: tuple(value) if isinstance(live.get(key), tuple) else value
                for key, value in stored.items()
            }
        )
    if accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        # Keyed by parameter name, full tensors: each process keeps its own shards.
        names = _parameter_names(model, inner)
        by_name = {
            "state": {names[index]: values for index, values in state.items()},
            "param_groups": [
                {**group, "params": [names[index] for index in group["params"]]} for group in groups
            ],
        }
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, inner, optim_state_dict=by_name, options=options)
    else:
        # Optimizer.load_state_dict casts each tensor to its parameter's dtype and device (the
        # "step" counters stay on the CPU unless the group is fused/capturable), as torch does.
        inner.load_state_dict({"state": state, "param_groups": groups})

    _torch_scheduler(scheduler).load_state_dict(read_json(directory / SCHEDULER_JSON))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(read_json(directory / SCALER_JSON))

    tensors_file, json_file = rng_files(accelerator.process_index)
    generators = _load_tensors(directory / tensors_file)
    states = read_json(directory / json_file)
    torch.set_rng_state(generators["torch"])
    cuda = [generators[f"cuda.{d}"] for d in range(len(generators)) if f"cuda.{d}" in generators]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    accelerator.step = states["accelerator_step"]
