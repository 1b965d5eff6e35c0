"""Every preset converts a checkpoint with Qwen2.5-VL-7B's dimensions (issue #14, "At scale").

The teacher has Qwen2.5-VL-7B-Instruct's config.json widths (SEVEN_B_TEXT, SEVEN_B_VISION:
hidden 3584, MLP 18944, 28 query heads over 4 key/value heads, so head_dim 128 and grouped-
query attention 7:1, vocabulary 152064, M-RoPE sections 16/24/24, rope theta 1e6, untied LM
head; a vision tower of width 1280, 16 heads, merger out 3584) but 2 decoder layers and 2
vision blocks (the real model has 28 and 32): 1.64 billion parameters, 3.3 GB in bfloat16.
It is saved as released checkpoints are: bfloat16, in shards with
model.safetensors.index.json, under Qwen's own key names (model.layers.*, visual.*,
lm_head.weight). Special token ids are the small BPE tokenizer's (test_processor_generate),
not Qwen's 151643+, so that the real processor drives the model; the embedding still has
152064 rows.

Each preset then runs as `linvid convert` does (convert_checkpoint), in its own process (one
at a time: memory), into a sharded bfloat16 student; the student loads back in float32
through AutoModelForImageTextToText, its mixers are moved off their init (open_mixers), and
greedy generate() from the processor's video input must be the argmax of one full forward
over the generated sequence, logits included. Time and peak memory (VmHWM) per preset are
printed. About 7 minutes on 2 CPU cores, 11.4 GB of memory at most and 7 GB of temporary
disk: `make test-scale`.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from linvid.models.plan import PRESETS, resolve_plan

pytestmark = pytest.mark.scale

# Qwen2.5-VL-7B-Instruct's config.json, but num_hidden_layers 2 (28) and depth 2 (32).
SEVEN_B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 2,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
}
SEVEN_B_VISION = {
    "depth": 2,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],  # the real tower's last block of every 8 attends fully
    "tokens_per_second": 2,
}
STUDENT_SHARD_SIZE = "2GB"  # a 3.4 GB student: two or more shards, as at full size
TEACHER_SHARD_SIZE = "2GB"
GIGABYTE = 1e9


def peak_memory() -> float:
    """This process's peak resident memory so far (VmHWM), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIGABYTE


def isolated(function, *arguments):
    """function(*arguments) in a fresh process (spawned: no copy of this one's memory), so
    that each measurement starts from an empty interpreter and its memory is freed after."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *arguments).result()


def save_teacher(directory: str) -> dict:
    """A random-init bfloat16 teacher of 7B widths (see the module doc) and its processor,
    saved sharded into `directory`. Returns its parameter count and the time taken."""
    from test_processor_generate import CORPUS, FRAME_SIZE
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from linvid.models.processor import build_bpe_tokenizer, build_processor, token_ids

    start = time.perf_counter()
    tokenizer = build_bpe_tokenizer(CORPUS, vocab_size=384)
    tokenizer.padding_side = "left"
    ids = token_ids(tokenizer)
    ids["vocab_size"] = SEVEN_B_TEXT["vocab_size"]
    special = {key: ids.pop(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = Qwen2_5_VLConfig(
        text_config={**SEVEN_B_TEXT, **special, "vocab_size": ids.pop("vocab_size")},
        vision_config=SEVEN_B_VISION,
        tie_word_embeddings=False,
        **ids,
        **special,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: 3.3 GB rather than 6.6 GB
    try:
        teacher = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    teacher.save_pretrained(directory, max_shard_size=TEACHER_SHARD_SIZE)
    build_processor(tokenizer, size=FRAME_SIZE).save_pretrained(directory)
    return {
        "parameters": sum(parameter.numel() for parameter in teacher.parameters()),
        "seconds": time.perf_counter() - start,
        "peak_gb": peak_memory(),
    }


def convert_and_check(teacher: str, preset: str, out: str) -> dict:
    """`linvid convert` of `teacher` with `preset` into `out`, then the float32 student's
    greedy generation against one full forward. Returns times, peak memory and what was
    converted; raises AssertionError on a mismatch."""
    from test_processor_generate import (
        LONG_VIDEO,
        chat_prompt,
        check_greedy_equals_one_full_forward,
        open_mixers,
    )
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import linvid  # noqa: F401  (registers the student with the Auto classes)
    from linvid.models.convert import convert_checkpoint
    from linvid.models.mixer_attention import MixerAttention
    from linvid.models.qwen2_5_vl import LinvidQwen2_5_VLForConditionalGeneration

    start = time.perf_counter()
    convert_checkpoint(teacher, preset, out, max_shard_size=STUDENT_SHARD_SIZE)
    converted = time.perf_counter()
    convert_peak = peak_memory()
    index = json.loads((Path(out) / "model.safetensors.index.linvid.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(name.startswith("model.linvid-") for name in shards), shards
    dtypes = set()
    for shard in shards:
        with safe_open(Path(out) / shard, framework="pt") as weights:
            dtypes |= {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {"BF16"}, f"a bfloat16 teacher must give a bfloat16 student, got {dtypes}"

    student = AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.float32, local_files_only=True
    ).eval()
    assert isinstance(student, LinvidQwen2_5_VLForConditionalGeneration)
    assert {parameter.dtype for parameter in student.parameters()} == {torch.float32}
    layers = tuple(
        index
        for index, layer in enumerate(student.model.language_model.layers)
        if isinstance(layer.self_attn, MixerAttention)
    )
    assert layers == resolve_plan(preset).layer_indices(2) and layers, layers
    open_mixers(student)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    inputs = processor(
        text=[chat_prompt(processor, "Describe the video.")],
        videos=[LONG_VIDEO],
        return_tensors="pt",
    )
    ((tokens, _),) = check_greedy_equals_one_full_forward(student, inputs)
    return {
        "preset": preset,
        "layers": layers,
        "shards": len(shards),
        "answer_tokens": len(tokens),
        "convert_s": converted - start,
        "check_s": time.perf_counter() - converted,
        "convert_peak_gb": convert_peak,
        "peak_gb": peak_memory(),
    }


def convert_memory(teacher: str, in_place: bool) -> dict:
    """Peak memory of linvid.convert(teacher, "rwkv6-all", in_place=...) on the bfloat16
    teacher: loading alone, then with the conversion."""
    from transformers import AutoModelForImageTextToText

    import linvid

    model = AutoModelForImageTextToText.from_pretrained(teacher, local_files_only=True)
    loaded = peak_memory()
    linvid.convert(model, "rwkv6-all", in_place=in_place)
    return {"loaded_gb": loaded, "peak_gb": peak_memory()}


@pytest.fixture(scope="module")
def teacher_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("seven_b") / "teacher"
    report = isolated(save_teacher, str(directory))
    print(
        f"\nteacher: {report['parameters'] / 1e9:.2f} B parameters, built and saved in "
        f"{report['seconds']:.0f} s, peak {report['peak_gb']:.1f} GB"
    )
    yield directory
    shutil.rmtree(directory, ignore_errors=True)  # 3.3 GB; pytest keeps old temporary folders


def test_the_teacher_is_sharded_under_qwens_key_names(teacher_directory):
    """The layout of Qwen/Qwen2.5-VL-7B-Instruct's model.safetensors.index.json, whose names
    transformers 5 renames on load (model.layers -> model.language_model.layers, visual ->
    model.visual)."""
    index = json.loads((teacher_directory / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) >= 2
    for name in (
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.k_proj.bias",
        "model.norm.weight",
        "lm_head.weight",
        "visual.patch_embed.proj.weight",
        "visual.blocks.1.attn.qkv.weight",
        "visual.merger.mlp.2.weight",
    ):
        assert name in names, name
    assert not any("language_model" in name or name.startswith("model.visual") for name in names)
    config = json.loads((teacher_directory / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    text = config["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 128  # head_dim
    assert text["num_attention_heads"] // text["num_key_value_heads"] == 7  # GQA 7:1


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_converts_and_decodes_like_one_full_forward(
    teacher_directory, tmp_path, preset
):
    out = tmp_path / "student"
    try:
        report = isolated(convert_and_check, str(teacher_directory), preset, str(out))
    finally:
        shutil.rmtree(out, ignore_errors=True)  # 3.4 GB per student
    print(
        f"\n{preset}: layers {report['layers']}, {report['shards']} shards, convert "
        f"{report['convert_s']:.0f} s (peak {report['convert_peak_gb']:.1f} GB), load in float32 "
        f"+ generate {report['answer_tokens']} tokens + full forward {report['check_s']:.0f} s "
        f"(peak {report['peak_gb']:.1f} GB)"
    )


def test_in_place_conversion_saves_a_copy_of_the_model(teacher_directory):
    """linvid.convert(in_place=True) (what convert_checkpoint does) against the default deep
    copy. transformers 5 maps a checkpoint already in the requested dtype into memory without
    reading it: converted in place, only the pages the conversion reads (the converted
    layers' attention weights) become resident; a deep copy reads and duplicates all 3.3 GB."""
    in_place = isolated(convert_memory, str(teacher_directory), True)
    copied = isolated(convert_memory, str(teacher_directory), False)
    print(
        f"\nconvert rwkv6-all on the bfloat16 teacher (loaded: {in_place['loaded_gb']:.1f} GB): "
        f"peak {in_place['peak_gb']:.1f} GB in place, {copied['peak_gb']:.1f} GB with a copy"
    )
    teacher_gb = 1.64e9 * 2 / GIGABYTE
    assert copied["peak_gb"] - in_place["peak_gb"] > 0.5 * teacher_gb
