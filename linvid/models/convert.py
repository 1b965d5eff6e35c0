"""`linvid.convert(model, plan)`: a Transformer video LLM in, a linear or hybrid student out;
`linvid.load(path)`: a saved student back."""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

from linvid.models.directory import (
    TEACHER_MODEL_TYPES,
    check_model_directory,
    decoder_layer_count,
)
from linvid.models.mixer_attention import ContextHolder
from linvid.models.plan import ConversionPlan, resolve_plan
from linvid.models.qwen2_5_vl import (
    LinvidQwen2_5_VLConfig,
    LinvidQwen2_5_VLForConditionalGeneration,
    replace_layers,
)
from linvid.outputs import atomic_directory, check_output

SUPPORTED = (Qwen2_5_VLForConditionalGeneration,)


# The seed of the parts of a conversion that are drawn rather than copied (RWKV-6's low-rank
# decay and token-shift adapters, Mamba-2's A_log / dt_bias / dt projection, random-init
# ablations): fixed by default, so that converting a teacher twice gives the same student.
DEFAULT_SEED = 0


def convert(
    model: nn.Module | str | os.PathLike,
    plan: ConversionPlan | str | dict,
    *,
    in_place: bool = False,
    seed: int = DEFAULT_SEED,
    **load_options,
):
    """Replace the plan's decoder layers of `model` by linear mixers initialised from their
    attention weights (plan.init="transfer", paper 000 §4.3 / 003 eq. 4-5 / MambaInLlama).

    model: a `Qwen2_5_VLForConditionalGeneration` (the teacher), or the path of a local
    checkpoint directory: then the teacher is loaded (safetensors only, its saved dtype unless
    `load_options` say otherwise, e.g. dtype=, device_map=) and converted in place, so only one
    model is ever in memory (the lean way for a 7B: ~1x its weights rather than 2x).
    plan: a ConversionPlan, a preset name ("qwen-rwkv-vl-25", "mamba2-hybrid-25", "linmu",
    "rwkv6-all", ...) or a dict.
    in_place: convert a given `model` itself (saves a copy of a large model's memory; the
    teacher is gone afterwards) instead of a deep copy (the default for a model object: the
    teacher stays usable, e.g. for distillation, at the cost of a second copy).
    seed: the seed of every drawn (not copied) parameter; the caller's random state is left as
    it was. Returns a `LinvidQwen2_5_VLForConditionalGeneration`; the vision tower,
    embeddings, MLPs, norms and LM head are the teacher's (copied or shared per in_place).
    """
    check_seed(seed)
    if isinstance(model, (str, os.PathLike)):
        config = check_model_directory(str(model), "model", model_types=TEACHER_MODEL_TYPES)
        depth = decoder_layer_count(config)
        if depth is not None:
            resolve_plan(plan).layer_indices(depth)  # before the teacher is loaded
        load_options = {"local_files_only": True, "use_safetensors": True, **load_options}
        model = AutoModelForImageTextToText.from_pretrained(model, **load_options)
        in_place = True
    elif load_options:
        raise ValueError(
            f"load options {sorted(load_options)} apply only when `model` is a checkpoint path"
        )
    plan = resolve_plan(plan)
    if isinstance(model, LinvidQwen2_5_VLForConditionalGeneration):
        raise ValueError("this model is already a linvid student; convert its teacher instead")
    if not isinstance(model, SUPPORTED):
        names = ", ".join(cls.__name__ for cls in SUPPORTED)
        raise ValueError(f"cannot convert a {type(model).__name__}; supported: {names}")
    plan.layer_indices(model.config.text_config.num_hidden_layers)  # validate before copying
    if hasattr(model.model.language_model, "transv"):
        raise ValueError("this model has TransV; convert its teacher first, then apply_transv")
    if not in_place:
        model = copy.deepcopy(model)
    attention_implementation = model.config._attn_implementation
    settings = model.config.to_dict()
    settings.pop("model_type", None)
    settings["linvid_plan"] = plan.to_dict()
    config = LinvidQwen2_5_VLConfig.from_dict(settings)
    config._attn_implementation = attention_implementation
    model.__class__ = LinvidQwen2_5_VLForConditionalGeneration
    model.config = config
    model.context_holder = ContextHolder()
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        replace_layers(model, plan, init=plan.init)
    return model


def check_seed(seed) -> None:
    """A conversion seed must be a non-negative integer (`linvid convert --seed`)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def load(path: str, **kwargs):
    """Load a saved linvid student (or any model the Auto classes know) from a directory.

    Weights are read from safetensors only (use_safetensors=True: a pickle checkpoint is never
    unpickled), and a local directory is read with local_files_only=True (never looked up on
    a model hub); both can be overridden through kwargs. Other kwargs are transformers':
    `dtype` (default: the saved dtype, e.g. a bfloat16 student stays bfloat16; dtype=
    torch.float32 to upcast), `device_map` ("cpu", "auto", ...). One file or shards with their
    index, in the "linvid" variant or plain. A student whose checkpoint does not fit its
    config.json plan raises StudentWeightsError (see the student class's from_pretrained)."""
    kwargs.setdefault("use_safetensors", True)
    if os.path.isdir(path):
        kwargs.setdefault("local_files_only", True)
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs)


def parse_layers(text: str, depth: int | None = None, option: str = "--layers") -> tuple:
    """Decoder layer indices from "0,2,5" (the `linvid convert --layers` value): a comma-
    separated list of distinct integers, each in 0..depth-1 when the model's `depth` (its
    number of decoder layers) is known. Raises ValueError naming `option`, the value and
    what is expected."""
    within = f" from 0 to {depth - 1}" if depth else ""
    expected = f"comma-separated decoder layer indices (integers{within}), e.g. 0,2,5"
    parts = [part.strip() for part in text.split(",")]
    bad = [part for part in parts if not part.lstrip("-").isdigit()]
    if bad:
        shown = ", ".join(repr(part) for part in bad)
        verb = "is not an integer" if len(bad) == 1 else "are not integers"
        raise ValueError(f"{option} expects {expected}; got {text!r} ({shown} {verb})")
    layers = tuple(int(part) for part in parts)
    repeated = sorted({index for index in layers if layers.count(index) > 1})
    if repeated:
        raise ValueError(
            f"{option} {text} names layers {repeated} more than once; expected {expected}"
        )
    outside = [index for index in layers if index < 0 or (depth and index >= depth)]
    if outside:
        model = f"the model has {depth} decoder layers" if depth else "indices start at 0"
        raise ValueError(
            f"{option} {text}: layers {outside} are out of range ({model}); expected {expected}"
        )
    return layers


# Files of a checkpoint directory that describe tokenisation and preprocessing, copied next
# to a converted model so that the student directory is complete.
PROCESSOR_FILE_PATTERNS = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template*",
    "generation_config.json",
)


# `linvid convert --dtype` choices: "auto" keeps the teacher's saved dtype (config.json's
# dtype, else its weights'), as transformers 5's from_pretrained does by default.
CHECKPOINT_DTYPES = ("auto", "bfloat16", "float16", "float32")
# Shards of at most this size, with an index (model.safetensors.index.linvid.json), as released
# checkpoints are saved; transformers' own default (50GB) would write one file per model.
DEFAULT_MAX_SHARD_SIZE = "5GB"
SHARD_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", re.IGNORECASE)


def convert_checkpoint(
    model_dir: str,
    plan,
    out_dir: str,
    *,
    overwrite: bool = False,
    dtype: str | torch.dtype = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    seed: int = DEFAULT_SEED,
) -> str:
    """Load a local checkpoint (one safetensors file, or shards with their
    model.safetensors.index.json as released checkpoints have, Qwen's own key names or
    transformers 5's), convert it in place, save the student (safetensors) and the
    tokenizer/processor files next to it. Returns out_dir.

    dtype: "auto" (default) keeps the teacher's saved dtype (a bfloat16 checkpoint gives a
    bfloat16 student, new mixer parameters included), or one of CHECKPOINT_DTYPES / a
    torch.dtype. max_shard_size: the student is written in shards of at most this size
    ("5GB", "500MB" or bytes), model.linvid-0000K-of-0000N.safetensors with
    model.safetensors.index.linvid.json, or as one model.linvid.safetensors when it fits.

    Follows the output rule (linvid/outputs.py): everything is checked before the teacher is
    loaded (`check_model_directory`, the plan against the teacher's depth, `check_output`):
    out_dir is never the teacher's directory, nor inside it or holding it, not even with
    `overwrite`; a non-empty out_dir is replaced only with `overwrite`, and then by exactly
    the new student (nothing of the old directory is kept). The student is written into a
    `.NAME.partial-*` directory beside out_dir and renamed into place when whole, so an
    error or interrupt leaves out_dir as it was. Errors name the `linvid convert` options.
    seed: the seed of the drawn parameters (`convert`)."""
    dtype = checkpoint_dtype(dtype)
    max_shard_size = shard_size(max_shard_size)
    check_seed(seed)
    config = check_model_directory(model_dir, "--model", model_types=TEACHER_MODEL_TYPES)
    plan = resolve_plan(plan)
    depth = decoder_layer_count(config)
    if depth is not None:
        plan.layer_indices(depth)  # a plan that does not fit, before the teacher is loaded
    check_output(out_dir, overwrite=overwrite, inputs=(model_dir,), option="--out")
    source = Path(model_dir)
    student = convert(source, plan, seed=seed, dtype=dtype)  # loaded and converted in place
    with atomic_directory(
        out_dir, overwrite=overwrite, inputs=(model_dir,), option="--out"
    ) as work:
        student.save_pretrained(work, max_shard_size=max_shard_size)
        for pattern in PROCESSOR_FILE_PATTERNS:
            for path in source.glob(pattern):
                if path.is_file() and not (work / path.name).exists():
                    shutil.copy2(path, work / path.name)
    return str(out_dir)


def checkpoint_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """`linvid convert --dtype`'s value checked: "auto" as is, a name of CHECKPOINT_DTYPES or a
    floating torch.dtype as a torch.dtype. Raises ValueError naming the choices."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if dtype == "auto":
        return dtype
    if dtype in CHECKPOINT_DTYPES:
        return getattr(torch, dtype)
    raise ValueError(f"--dtype must be one of {', '.join(CHECKPOINT_DTYPES)}; got {dtype!r}")


def shard_size(size: int | str) -> int | str:
    """`linvid convert --max-shard-size`'s value checked before the teacher is loaded: a
    positive number of bytes, or a size such as "5GB" / "500MB" (units KB, MB, GB, TB, powers
    of 1000 as transformers reads them). Raises ValueError with an example."""
    expected = 'a positive size such as "5GB" or "500MB" (units KB, MB, GB, TB) or bytes'
    if isinstance(size, str) and size.strip().isdigit():
        size = int(size)
    if isinstance(size, int) and not isinstance(size, bool):
        if size > 0:
            return size
    elif isinstance(size, str):
        match = SHARD_SIZE.fullmatch(size)
        if match and float(match.group(1)) > 0:
            return f"{match.group(1)}{match.group(2).upper()}"
    raise ValueError(f"--max-shard-size expects {expected}; got {size!r}")
