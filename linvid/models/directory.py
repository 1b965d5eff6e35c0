"""Checks of a local model directory before anything is loaded from it.

linvid reads models from local directories only (as `save_pretrained` writes them): a path is
never looked up on a model hub, and weights are read from safetensors files only (a pickle
checkpoint is never unpickled: unpickling can run arbitrary code). `check_model_directory`
turns each way a `--model` / `--teacher` / `--student` path can be wrong into one ValueError
that names the option, the path and what was expected, instead of the hub, pickle or
"video tokens do not match" errors the loaders would give later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Files that hold a tokenizer's vocabulary (any one is enough): a fast tokenizer, a BPE
# vocabulary (with merges.txt), a sentencepiece model.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
# Pickle checkpoints linvid refuses to read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# model_type of the models linvid runs: Qwen2.5-VL teachers and their linvid students.
TEACHER_MODEL_TYPES = ("qwen2_5_vl",)
VIDEO_MODEL_TYPES = ("qwen2_5_vl", "linvid_qwen2_5_vl")
MODEL_TYPE_NAMES = {
    "qwen2_5_vl": "a Qwen2.5-VL model (a teacher)",
    "linvid_qwen2_5_vl": "a linvid student (a converted Qwen2.5-VL)",
}


def check_model_directory(
    path,
    option: str = "--model",
    *,
    tokenizer: bool = False,
    model_types: tuple[str, ...] = VIDEO_MODEL_TYPES,
) -> dict:
    """Check that `path` is a local model directory linvid can load, before loading it.

    Checks, in order, raising ValueError (message: `option`, `path`, what is wrong and what is
    expected) at the first problem:
    - the path exists (a missing path is named as missing, never sent to a model hub) and is
      a directory, not a file;
    - it holds a config.json that parses as a JSON object;
    - its model_type is one of `model_types` (default: a Qwen2.5-VL-style video model, a
      teacher or a linvid student); a text-only or other model is named by its model_type
      and architecture;
    - it holds safetensors weights (*.safetensors, or a model.safetensors.index[.linvid].json); a
      directory with only pickle weights (*.bin, *.pt, ...) is refused: linvid never
      unpickles a checkpoint;
    - with `tokenizer`, it holds tokenizer files (one of TOKENIZER_FILES).

    Returns the parsed config.json."""
    directory = Path(os.fspath(path))
    if not directory.exists():
        raise ValueError(
            f"{option} {path} does not exist: expected a local model directory (linvid reads "
            "models from local directories only, never from a model hub)"
        )
    if not directory.is_dir():
        raise ValueError(
            f"{option} {path} is a file, not a directory: expected a local model directory "
            "as save_pretrained writes it (config.json, *.safetensors, tokenizer files)"
        )
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{option} {path} has no config.json: expected a model directory as "
            "save_pretrained writes it (config.json and *.safetensors weights)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{option} {path}: config.json does not read as JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{option} {path}: config.json holds no JSON object")
    _check_model_type(config, path, option, model_types)
    _check_weights(directory, path, option)
    if tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{option} {path} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}): "
            "save the model's tokenizer (or processor) into the directory with save_pretrained"
        )
    return config


def decoder_layer_count(config: dict) -> int | None:
    """The number of decoder layers a Qwen2.5-VL config.json (as a dict) declares, or None."""
    text_config = config.get("text_config")
    count = text_config.get("num_hidden_layers") if isinstance(text_config, dict) else None
    count = config.get("num_hidden_layers") if count is None else count
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _check_model_type(config: dict, path, option: str, model_types: tuple[str, ...]) -> None:
    model_type = config.get("model_type")
    if model_type in model_types:
        return
    expected = " or ".join(f"{MODEL_TYPE_NAMES.get(kind, kind)} ({kind!r})" for kind in model_types)
    architectures = config.get("architectures") or []
    described = MODEL_TYPE_NAMES.get(model_type)
    if described is None:
        names = ", ".join(str(name) for name in architectures) or "no architecture listed"
        described = f"a {model_type!r} model ({names})"
        if "vision_config" not in config:
            described += ", without a vision tower"
    if model_type is None:
        described = "a config.json without a model_type"
    hint = ""
    if model_type == "linvid_qwen2_5_vl":
        hint = "; give its teacher's directory instead"
    raise ValueError(
        f"{option} {path} holds {described}; expected {expected} in config.json's model_type "
        f"(a Qwen2.5-VL-style video model){hint}"
    )


def _check_weights(directory: Path, path, option: str) -> None:
    names = sorted(entry.name for entry in directory.iterdir() if entry.is_file())
    if any(
        name.endswith(".safetensors") or name.startswith("model.safetensors.index.")
        for name in names
    ):
        return
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"{option} {path} holds pickle weights only ({', '.join(pickles[:3])}): linvid loads "
            "safetensors weights only and never unpickles a checkpoint; save the model with "
            "save_pretrained (safetensors) first"
        )
    raise ValueError(
        f"{option} {path} has no weights (*.safetensors): expected a model directory as "
        "save_pretrained writes it"
    )
