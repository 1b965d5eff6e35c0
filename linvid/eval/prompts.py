"""Prompts for a question about a video, in the chat format of Qwen2.5-VL-style models.

Two layouts: "standard" (the video, then the question) and "sandwich" (paper 001 §3.2.3,
after VisualRWKV: the question, the video, the question again), which helps recurrent
backbones that read the visual tokens before knowing what to look for.
"""

from __future__ import annotations

PROMPT_STYLES = ("standard", "sandwich")
VIDEO_PLACEHOLDER = "<|video_pad|>"
# Qwen2.5-VL's chat layout, for tokenizers that carry no chat template (small test
# vocabularies); real checkpoints use their own template. Parts render as in Qwen2.5-VL's
# template (`linvid.models.processor.CHAT_TEMPLATE`): an image or a video as one placeholder
# between <|vision_start|> and <|vision_end|> (the processor, or the data loader, expands it);
# unlike Qwen's, no default system turn is added.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def video_messages(question: str, *, style: str = "standard", system: str | None = None):
    """Chat messages asking `question` about one video.

    style "standard": [video, question]; "sandwich": [question, video, question] (paper 001
    §3.2.3). system: an optional system message.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    video = {"type": "video"}
    text = {"type": "text", "text": question}
    content = [video, text] if style == "standard" else [text, video, dict(text)]
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": content}]


def render_video_prompt(tokenizer, messages, num_video_tokens: int) -> list[int]:
    """Token ids of the chat prompt with its one video placeholder expanded to
    `num_video_tokens` copies (what Qwen2.5-VL's processor does)."""
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )
    if text.count(VIDEO_PLACEHOLDER) != 1:
        raise ValueError(
            f"the chat template rendered {text.count(VIDEO_PLACEHOLDER)} video placeholders "
            f"({VIDEO_PLACEHOLDER}); expected exactly 1"
        )
    before, after = text.split(VIDEO_PLACEHOLDER)
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER)
    before_ids = tokenizer(before, add_special_tokens=False)["input_ids"]
    after_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return [*before_ids, *([video_id] * num_video_tokens), *after_ids]
