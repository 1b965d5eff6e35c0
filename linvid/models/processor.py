"""A real Qwen2.5-VL processor built offline: a small byte-level BPE tokenizer trained with
`tokenizers` on a given corpus, with Qwen2.5-VL's special tokens and chat template, joined to
transformers' default Qwen2-VL image and video processors. For tests and demos that need what
a user gets from `AutoProcessor.from_pretrained("Qwen/Qwen2.5-VL-...")` without the hub; a
real checkpoint ships its own files (a 151,643-token BPE vocabulary and the same specials).
`token_ids(tokenizer)` (from linvid.models.tokenizer) gives the ids a tiny config needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from linvid.models.tokenizer import token_ids

__all__ = [
    "ADDED_TOKENS",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_bpe_tokenizer",
    "build_processor",
    "load_processor",
    "token_ids",
]

# Qwen2.5(-VL)'s added tokens, in the order of their ids in the real tokenizer (151643 on,
# right after the BPE vocabulary). The first is the padding token, "<|im_end|>" ends a turn
# (the eos of the Instruct models); the image and video placeholders are what the processor
# expands to one token per merged patch.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added but not special in Qwen's tokenizer (decoding keeps them): tool calls, fill-in-the-middle.
ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# The chat template Qwen2.5-VL-Instruct ships (chat_template.json of Qwen/Qwen2.5-VL-7B-Instruct,
# the same in its 3B/32B/72B siblings), written out here from that format: a default system
# turn, `{"type": "video"}` content as <|vision_start|><|video_pad|><|vision_end|> (one pad that
# the processor expands), images likewise, optional "Picture n: " / "Video n: " labels.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# Text every chat prompt contains, added to the training corpus so that the role names and the
# default system prompt get merges of their own, as they have in a real vocabulary.
_CHAT_TEXT = ("system\nYou are a helpful assistant.", "user\n", "assistant\n")


def build_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A Qwen2-style byte-level BPE tokenizer trained on `corpus`, offline.

    The BPE vocabulary (the 256 byte symbols plus merges) has at most `vocab_size` entries:
    fewer when the corpus offers no more merges. Qwen2.5-VL's SPECIAL_TOKENS and ADDED_TOKENS
    follow it, in Qwen's order; "<|endoftext|>" pads, "<|im_end|>" is the eos, there is no bos
    and no unknown token (bytes cover every text). Normalisation (NFC), pre-tokenisation (Qwen2's
    split regex, then bytes to symbols) and decoding are transformers' `Qwen2Tokenizer`'s, so the
    result is a `Qwen2Tokenizer` that saves and loads like a real checkpoint's; the chat template
    is set. A real Qwen2.5-VL tokenizer has 151,643 BPE entries trained on its own data instead.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least the 256 byte symbols, got {vocab_size}")
    # Qwen2Tokenizer builds Qwen2's pipeline around whatever vocabulary it gets: train a BPE
    # model inside that same pipeline, then hand the learned vocabulary and merges back to it.
    pipeline = Qwen2Tokenizer().backend_tokenizer
    backend = Tokenizer(models.BPE())
    backend.normalizer = pipeline.normalizer
    backend.pre_tokenizer = pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*_CHAT_TEXT, *corpus], trainer)
    learned = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=learned["vocab"],
        merges=[tuple(merge) for merge in learned["merges"]],
        unk_token=None,
        # "<|endoftext|>" as eos here only so that it takes the first added id, as in Qwen's
        # vocabulary (the tokenizer adds its eos and pad before the other specials).
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.add_tokens([AddedToken(token, special=False) for token in ADDED_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, **video_processor_kwargs) -> Qwen2_5_VLProcessor:
    """A `Qwen2_5_VLProcessor` around `tokenizer` (from build_bpe_tokenizer) with transformers'
    default image processor (`Qwen2VLImageProcessor`, the class AutoImageProcessor picks for
    Qwen2.5-VL when torchvision is installed) and video processor (`Qwen2VLVideoProcessor`,
    built with `video_processor_kwargs`, e.g. `size={"shortest_edge": 56 * 56, "longest_edge":
    112 * 112}` to keep tiny frames at their size), and Qwen2.5-VL's chat template.

    cap_pixels_per_frame defaults to True, the per-video pixel budget of the reference
    preprocessing (qwen-vl-utils) that transformers will make its default. A real checkpoint
    ships its preprocessor configs (pixel ranges for its model) instead of these defaults.
    The processor saves with `save_pretrained` and loads back with `AutoProcessor`, offline.
    """
    video_processor_kwargs.setdefault("cap_pixels_per_frame", True)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**video_processor_kwargs),
        chat_template=CHAT_TEMPLATE,
    )


def load_processor(model_dir):
    """The Qwen2.5-VL processor a model directory ships (processor / preprocessor / video
    preprocessor config beside the weights, as real checkpoints have), or None when it ships
    none (then the tokenizer and linvid's `video_inputs` make the same inputs)."""
    from pathlib import Path

    from transformers import AutoProcessor

    names = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
    if not any((Path(model_dir) / name).is_file() for name in names):
        return None
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    if getattr(processor, "video_processor", None) is None:
        return None
    return processor
