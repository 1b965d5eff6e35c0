"""`linvid.convert(model, plan)`: a Transformer video LLM in, a linear or hybrid student out;
`linvid.load(path)`: a saved student back."""

from __future__ import annotations

import copy

from torch import nn
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

from linvid.models.mixer_attention import ContextHolder
from linvid.models.plan import ConversionPlan, resolve_plan
from linvid.models.qwen2_5_vl import (
    LinvidQwen2_5_VLConfig,
    LinvidQwen2_5_VLForConditionalGeneration,
    replace_layers,
)

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
    """Load a saved linvid student (or any model the Auto classes know) from a directory."""
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs)


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


def convert_checkpoint(model_dir: str, plan, out_dir: str) -> str:
    """Load a local checkpoint, convert it in place, save the student (safetensors) and the
    tokenizer/processor files next to it. Returns out_dir."""
    import shutil
    from pathlib import Path

    source = Path(model_dir)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}: expected a checkpoint directory")
    plan = resolve_plan(plan)
    model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True)
    student = convert(model, plan, in_place=True)
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(target)
    for pattern in PROCESSOR_FILE_PATTERNS:
        for path in source.glob(pattern):
            if path.is_file() and not (target / path.name).exists():
                shutil.copy2(path, target / path.name)
    return str(target)
