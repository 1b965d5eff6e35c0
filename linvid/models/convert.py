"""`linvid.convert(model, plan)`: a Transformer video LLM in, a linear or hybrid student out;
`linvid.load(path)`: a saved student back."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

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


def convert(model: nn.Module, plan: ConversionPlan | str | dict, *, in_place: bool = False):
    """Replace the plan's decoder layers of `model` by linear mixers initialised from their
    attention weights (plan.init="transfer", paper 000 §4.3 / 003 eq. 4-5 / MambaInLlama).

    model: a `Qwen2_5_VLForConditionalGeneration` (the teacher). plan: a ConversionPlan, a
    preset name ("qwen-rwkv-vl-25", "mamba2-hybrid-25", "linmu", "rwkv6-all", ...) or a dict.
    in_place: convert `model` itself (saves a copy of a large model's memory) instead of a
    deep copy. Returns a `LinvidQwen2_5_VLForConditionalGeneration`; the vision tower,
    embeddings, MLPs, norms and LM head are the teacher's (copied or shared per in_place).
    """
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
    replace_layers(model, plan, init=plan.init)
    return model


def load(path: str, **kwargs):
    """Load a saved linvid student (or any model the Auto classes know) from a directory.

    Weights are read from safetensors only (use_safetensors=True: a pickle checkpoint is never
    unpickled), and a local directory is read with local_files_only=True (never looked up on
    a model hub); both can be overridden through kwargs. A student whose checkpoint does not
    fit its config.json plan raises StudentWeightsError (see the student class's
    from_pretrained)."""
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


def convert_checkpoint(model_dir: str, plan, out_dir: str, *, overwrite: bool = False) -> str:
    """Load a local checkpoint, convert it in place, save the student (safetensors) and the
    tokenizer/processor files next to it. Returns out_dir.

    Follows the output rule (linvid/outputs.py): everything is checked before the teacher is
    loaded (`check_model_directory`, the plan against the teacher's depth, `check_output`):
    out_dir is never the teacher's directory, nor inside it or holding it, not even with
    `overwrite`; a non-empty out_dir is replaced only with `overwrite`, and then by exactly
    the new student (nothing of the old directory is kept). The student is written into a
    `.NAME.partial-*` directory beside out_dir and renamed into place when whole, so an
    error or interrupt leaves out_dir as it was. Errors name the `linvid convert` options."""
    config = check_model_directory(model_dir, "--model", model_types=TEACHER_MODEL_TYPES)
    plan = resolve_plan(plan)
    depth = decoder_layer_count(config)
    if depth is not None:
        plan.layer_indices(depth)  # a plan that does not fit, before the teacher is loaded
    check_output(out_dir, overwrite=overwrite, inputs=(model_dir,), option="--out")
    source = Path(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(
        source, local_files_only=True, use_safetensors=True
    )
    student = convert(model, plan, in_place=True)
    with atomic_directory(
        out_dir, overwrite=overwrite, inputs=(model_dir,), option="--out"
    ) as work:
        student.save_pretrained(work)
        for pattern in PROCESSOR_FILE_PATTERNS:
            for path in source.glob(pattern):
                if path.is_file() and not (work / path.name).exists():
                    shutil.copy2(path, work / path.name)
    return str(out_dir)
