"""A small word-level tokenizer with Qwen2.5-VL's special tokens, for models trained from
scratch on a closed vocabulary (the offline demo, tests). Real checkpoints bring their own."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Qwen2.5-VL's special tokens, in the order they take the first ids.
SPECIAL_TOKENS = (
    "<|endoftext|>",  # padding
    "<|im_start|>",
    "<|im_end|>",  # end of a turn: the eos of generation
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)


def build_word_tokenizer(words) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is SPECIAL_TOKENS, the chat-role words and `words`
    (split on whitespace and punctuation; each distinct word one id, in first-seen order)."""
    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    splitter = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    for word in ["system", "user", "assistant", *words]:
        for piece, _ in splitter.pre_tokenize_str(word):
            vocabulary.setdefault(piece, len(vocabulary))
    model = models.WordLevel(vocab=vocabulary, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = splitter
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:-1]),
        clean_up_tokenization_spaces=False,
    )


def token_ids(tokenizer) -> dict[str, int]:
    """The ids a Qwen2.5-VL config needs from this tokenizer."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    return {
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "bos_token_id": ids["<|im_start|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vocab_size": len(tokenizer),
    }
