"""The default chat template (tokenizers without their own) renders image parts as Qwen2.5-VL's
own template does, so image conversations tokenise with it."""

import pytest

from linvid.distill.data import VideoConversationDataset, read_conversations
from linvid.eval.prompts import DEFAULT_CHAT_TEMPLATE
from linvid.models.processor import CHAT_TEMPLATE
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.tokenizer import build_word_tokenizer, token_ids

IMAGE = {"type": "image"}
VIDEO = {"type": "video"}
CONVERSATIONS = {  # user content, images in it (the part forms Qwen's template accepts)
    "one_image": ([IMAGE, {"type": "text", "text": "describe it"}], 1),
    "two_images": (
        [
            {"type": "text", "text": "compare"},
            {"type": "image", "image": "a.png"},
            {"type": "text", "text": "and"},
            {"image": "b.png"},
        ],
        2,
    ),
    "image_and_video": ([{"type": "image_url", "image_url": "c.png"}, VIDEO], 1),
    "sandwich_video": (
        [{"type": "text", "text": "what"}, VIDEO, {"type": "text", "text": "what"}],
        0,
    ),
}


@pytest.mark.parametrize("content, images", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_default_template_renders_as_qwen_s(content, images, generation_prompt):
    """Same text as Qwen2.5-VL's template for the same messages (given a system turn: Qwen's
    adds a default one, the default template none)."""
    tokenizer = build_word_tokenizer(["describe it compare and what"])
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": content},
        {"role": "assistant", "content": "a red square"},
        {"role": "user", "content": [{"type": "text", "text": "and now"}]},
    ]
    rendered = {
        name: tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )
        for name, template in (("default", DEFAULT_CHAT_TEMPLATE), ("qwen", CHAT_TEMPLATE))
    }
    assert rendered["default"] == rendered["qwen"]
    assert rendered["default"].count("<|vision_start|><|image_pad|><|vision_end|>") == images


def test_image_lines_tokenise_with_the_default_template(tmp_path):
    """An image line through the data loader with a template-less tokenizer: one expanded
    image run per image, and the same ids as with Qwen's template after its system turn."""
    from PIL import Image

    for name, size in (("a.png", (56, 56)), ("b.png", (84, 56))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    (tmp_path / "train.jsonl").write_text(
        '{"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": '
        '"compare <image> and <image>"}, {"from": "gpt", "value": "red"}]}\n'
    )
    tokenizer = build_word_tokenizer(["compare and red"])
    assert tokenizer.chat_template is None
    config = tiny_qwen2_5_vl_config(token_ids=token_ids(tokenizer))
    samples = read_conversations(tmp_path / "train.jsonl")
    item = VideoConversationDataset(samples, tokenizer, config.vision_config)[0]
    assert item["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]  # 4 + 6 merged tokens
    assert int((item["input_ids"] == config.image_token_id).sum()) == 10
    tokenizer.chat_template = CHAT_TEMPLATE
    qwen = VideoConversationDataset(samples, tokenizer, config.vision_config)[0]
    system = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], chat_template=CHAT_TEMPLATE, tokenize=False
    ).split("<|im_start|>user")[0]
    prefix = tokenizer(system, add_special_tokens=False)["input_ids"]
    assert qwen["input_ids"].tolist() == prefix + item["input_ids"].tolist()
