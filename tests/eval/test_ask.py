"""Answering a question about a video: whole-video generate() and chunked streaming prefill."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.eval.ask import ask, can_stream
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.tokenizer import build_word_tokenizer, token_ids

QUESTION = "what color is the circle ?"
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 56 * 112}


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([QUESTION, "red green blue yellow"])


@pytest.fixture(scope="module")
def teacher(tokenizer):
    torch.manual_seed(0)
    config = tiny_qwen2_5_vl_config(num_layers=2, token_ids=token_ids(tokenizer))
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def frames():
    return torch.randint(
        0, 256, (8, 3, 56, 112), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )


def test_which_models_can_stream(teacher):
    assert not can_stream(teacher)
    assert can_stream(linvid.convert(teacher, "rwkv6-all"))
    assert not can_stream(linvid.convert(teacher, "linmu"))  # reverse direction needs all
    assert not can_stream(linvid.convert(teacher, "qwen-rwkv-vl-25"))  # attention layers


def test_teacher_answers_with_counts(teacher, tokenizer, frames):
    answer = ask(teacher, tokenizer, frames, QUESTION, max_new_tokens=4, **PIXELS)
    assert not answer.streamed and len(answer.new_tokens) <= 4
    assert answer.counts["frames"] == 8 and answer.counts["video_tokens"] == 4 * 2 * 4
    assert answer.counts["prompt_tokens"] > answer.counts["video_tokens"]
    assert set(answer.seconds) == {"preprocess", "generate"}


@pytest.mark.parametrize("style", ["standard", "sandwich"])
def test_streaming_prefill_answers_like_the_whole_video(teacher, tokenizer, frames, style):
    student = linvid.convert(teacher, "rwkv6-all")
    whole = ask(
        student, tokenizer, frames, QUESTION, style=style, stream=False, max_new_tokens=6, **PIXELS
    )
    chunks = [frames[:2], frames[2:6], frames[6:]]
    streamed = ask(student, tokenizer, chunks, QUESTION, style=style, max_new_tokens=6, **PIXELS)
    assert streamed.streamed and not whole.streamed
    assert streamed.new_tokens == whole.new_tokens
    assert streamed.counts["video_tokens"] == whole.counts["video_tokens"]
    assert streamed.counts["prompt_tokens"] == whole.counts["prompt_tokens"]


def test_streaming_is_refused_for_models_with_attention(teacher, tokenizer, frames):
    with pytest.raises(ValueError, match="causal linear mixer"):
        ask(teacher, tokenizer, frames, QUESTION, stream=True)


def test_per_frame_token_merging_shrinks_the_prompt(teacher, tokenizer, frames):
    plain = ask(teacher, tokenizer, frames, QUESTION, max_new_tokens=4, **PIXELS)
    unmerged = ask(
        teacher, tokenizer, frames, QUESTION, max_new_tokens=4, tokens_per_frame=8, **PIXELS
    )  # 8 >= the 2 x 4 tokens of a frame: nothing merges
    merged = ask(
        teacher, tokenizer, frames, QUESTION, max_new_tokens=4, tokens_per_frame=2, **PIXELS
    )
    assert unmerged.new_tokens == plain.new_tokens
    assert merged.counts["video_tokens"] == 4 * 2  # 4 temporal patches x 2 tokens
    assert merged.counts["prompt_tokens"] == plain.counts["prompt_tokens"] - 4 * 6
    with pytest.raises(ValueError, match="needs the whole video"):
        ask(
            linvid.convert(teacher, "rwkv6-all"),
            tokenizer,
            frames,
            QUESTION,
            stream=True,
            tokens_per_frame=2,
        )
