"""Video prompts: standard and sandwich layouts, and placeholder expansion."""

import pytest

from linvid.eval.prompts import render_video_prompt, video_messages
from linvid.models.tokenizer import build_word_tokenizer, token_ids

QUESTION = "what color is the circle ?"


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([QUESTION, "red green blue"])


def test_standard_prompt_puts_the_question_after_the_video(tokenizer):
    ids = render_video_prompt(tokenizer, video_messages(QUESTION), 3)
    video = token_ids(tokenizer)["video_token_id"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    positions = [index for index, token in enumerate(ids) if token == video]
    assert len(positions) == 3 and positions == list(range(positions[0], positions[0] + 3))
    after = ids[positions[-1] + 1 :]
    assert question == after[1 : 1 + len(question)]  # right after <|vision_end|>
    assert tokenizer.decode(ids[-2:]) == "<|im_start|> assistant"


def test_sandwich_prompt_has_the_question_on_both_sides_of_the_video(tokenizer):
    ids = render_video_prompt(tokenizer, video_messages(QUESTION, style="sandwich"), 4)
    text = tokenizer.decode(ids)
    before, after = text.split("<|vision_start|>")
    assert QUESTION in before and QUESTION in after
    assert text.count("<|video_pad|>") == 4


def test_system_message_and_bad_input(tokenizer):
    messages = video_messages(QUESTION, system="red")
    assert messages[0] == {"role": "system", "content": "red"}
    with pytest.raises(ValueError, match="unknown prompt style"):
        video_messages(QUESTION, style="club")
    with pytest.raises(ValueError, match="non-empty string"):
        video_messages("  ")


def test_unknown_words_map_to_unk_and_specials_round_trip(tokenizer):
    assert tokenizer.decode(tokenizer("red purple")["input_ids"]) == "red <unk>"
    ids = token_ids(tokenizer)
    assert ids["eos_token_id"] == tokenizer.eos_token_id and ids["vocab_size"] == len(tokenizer)
