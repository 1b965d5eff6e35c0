"""A real Qwen2_5_VLProcessor (a small byte-level BPE tokenizer, Qwen2.5-VL's special tokens and
chat template, transformers' default image and video processors) drives the teacher and every
preset (issue #11): the processor round-trips offline, `generate(**processor(...))` runs, its
greedy tokens are the argmax of one full forward, alone and in a left-padded batch of two
videos of different lengths, and second_per_grid_ts reaches the M-RoPE positions.

Tiny sizes: 4 decoder layers of width 64, a ~400-token vocabulary, videos of 8 frames of
56x56 (16 video tokens) and 4 frames of 84x112 (24 video tokens)."""

import numpy as np
import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLVideoProcessor,
)

import linvid
from linvid.models.convert import convert_checkpoint
from linvid.models.mixer_attention import MixerAttention
from linvid.models.plan import PRESETS
from linvid.models.processor import (
    ADDED_TOKENS,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_bpe_tokenizer,
    build_processor,
    token_ids,
)
from linvid.models.tiny import tiny_qwen2_5_vl_config

CORPUS = (
    "Describe the video.",
    "What happens in this clip?",
    "A red square moves from the left to the right.",
    "The camera pans over a green field while a ball rolls by.",
    "Count the objects in the video and name their colours.",
)
# Keep tiny frames at their own size (the defaults would upscale them to >= 100,352 pixels).
FRAME_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
# What `processor(text=..., videos=..., return_tensors="pt")` returns for a video prompt, on
# transformers 5.23 and 5.24 alike.
VIDEO_INPUT_KEYS = {
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
}
MODEL_NAMES = ("teacher", *PRESETS)
NEW_TOKENS = 8
# Cached decoding, left padding and batching change only the order of float32 reductions: at
# most 5e-6 apart here. The logits spread ~0.4 and the smallest top-2 margin of a greedy step
# is 7.5e-4, so 1e-4 keeps the argmax comparisons safe from rounding and still tells a wrong
# position, a leaked pad token or a lost state apart.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def video(frames, height, width, seed):
    """(frames, height, width, 3) uint8: a noise background with a coloured square moving
    right, so that every frame differs and the two videos differ."""
    generator = np.random.default_rng(seed)
    background = generator.integers(0, 256, size=(1, height, width, 3), dtype=np.uint8)
    clip = background.repeat(frames, axis=0)
    colour = generator.integers(0, 256, size=3, dtype=np.uint8)
    for index in range(frames):
        left = 4 + 5 * index
        clip[index, 8:24, left : left + 16] = colour
    return clip


LONG_VIDEO = video(8, 56, 56, seed=0)  # grid (4, 4, 4): 16 video tokens
SHORT_VIDEO = video(4, 84, 112, seed=1)  # grid (2, 6, 8): 24 video tokens


def chat_prompt(processor, question):
    """A user turn with one video and a question, ready for the assistant's answer."""
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_bpe_tokenizer(CORPUS, vocab_size=384)
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return build_processor(tokenizer, size=FRAME_SIZE)


def open_mixers(student, seed=1):
    """Move every mixer parameter off its init, as training would, and open the hybrid
    cross-attention's static gate (0 at init: the scene branch would be silent and anything it
    caches during generation untested)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in student.modules():
            if not isinstance(module, MixerAttention):
                continue
            for parameter in module.mixer.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
            cross_attention = getattr(module.mixer, "cross_attention", None)
            if cross_attention is not None:
                cross_attention.static_gate.fill_(0.8)
    return student


@pytest.fixture(scope="module")
def models(processor):
    """The random-init teacher (fixed seed, token ids from the BPE tokenizer) and each preset
    converted from it, with open mixers."""
    config = tiny_qwen2_5_vl_config(num_layers=4, token_ids=token_ids(processor.tokenizer))
    # Wider than the default 0.02 so that attention (and the mixers built from it) depends on
    # more than the last tokens: with this seed the answers vary along the sequence and
    # between the two videos, for the teacher and every student.
    config.text_config.initializer_range = 0.05
    torch.manual_seed(1)
    teacher = Qwen2_5_VLForConditionalGeneration(config).eval()
    built = {"teacher": teacher}
    for name in PRESETS:
        built[name] = open_mixers(linvid.convert(teacher, name)).eval()
    return built


def with_tokens(inputs, sequences):
    """The processor's inputs with input_ids replaced by `sequences` (prompt + generated
    tokens): the attention mask and the token types extended with ones and zeros (text)."""
    extra = sequences.shape[1] - inputs["input_ids"].shape[1]
    batch = sequences.shape[0]
    full = dict(inputs, input_ids=sequences)
    full["attention_mask"] = torch.cat(
        [inputs["attention_mask"], inputs["attention_mask"].new_ones(batch, extra)], dim=1
    )
    full["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"], inputs["mm_token_type_ids"].new_zeros(batch, extra)], dim=1
    )
    return full


def placeholder_ids(model):
    """The image and video placeholder ids. A trained model never emits them; a random one
    may, and a forward over a sequence holding one more placeholder than there are vision
    features fails (transformers counts placeholders in input_ids), so greedy decoding here
    picks among the other tokens."""
    return [model.config.image_token_id, model.config.video_token_id]


def generate(model, inputs):
    """Greedy generation from the processor's output, placeholders suppressed: (prompt +
    answer (B, L + N), the raw logits of the N steps (B, N, V), the prompt length L)."""
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            suppress_tokens=placeholder_ids(model),
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt_length = inputs["input_ids"].shape[1]
    return output.sequences, torch.stack(output.logits, dim=1), prompt_length


def answer_length(tokens, eos_token_id):
    """How many of `tokens` (N,) generate() chose: up to and including the first eos (after it
    a finished sample gets padding)."""
    ends = (tokens == eos_token_id).nonzero()
    return int(ends[0]) + 1 if len(ends) else tokens.shape[0]


def check_greedy_equals_one_full_forward(model, inputs):
    """generate()'s tokens and logits against one teacher-forced forward over prompt + answer
    (logits at position t predict token t + 1). Returns each sample's (tokens, logits)."""
    sequences, step_logits, prompt_length = generate(model, inputs)
    with torch.no_grad():
        full = model(**with_tokens(inputs, sequences), use_cache=False).logits
    predicting = full[:, prompt_length - 1 : -1]  # the logits of every generated position
    allowed = predicting.clone()
    allowed[..., placeholder_ids(model)] = -torch.inf
    eos = model.generation_config.eos_token_id
    answers = []
    for row in range(sequences.shape[0]):
        tokens = sequences[row, prompt_length:]
        length = answer_length(tokens, eos)
        assert length >= 3, f"sample {row} ended after {length} tokens: too short to compare"
        assert torch.equal(tokens[:length], allowed[row, :length].argmax(-1)), row
        torch.testing.assert_close(step_logits[row, :length], predicting[row, :length], **TOLERANCE)
        answers.append((tokens[:length], step_logits[row, :length]))
    return answers


def test_bpe_tokenizer_is_shaped_like_qwens(processor):
    tokenizer = processor.tokenizer
    added = [*SPECIAL_TOKENS, *ADDED_TOKENS]
    bpe_size = len(tokenizer) - len(added)
    assert 256 < bpe_size <= 384  # the bytes, merges learned from the corpus, the cap
    # Qwen's order: the added tokens take the ids right after the BPE vocabulary.
    assert tokenizer.convert_tokens_to_ids(added) == list(range(bpe_size, len(tokenizer)))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    # Byte-level: any text, in or out of the corpus, round-trips; words of the corpus merge.
    text = "Ünïcode ✓ 12345\n\n  two  spaces\tand a tab"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer.tokenize(" video")) == 1
    # Specials are one token each; ADDED_TOKENS are kept when special tokens are skipped.
    ids = tokenizer("<|vision_start|><|video_pad|><|vision_end|><tool_call>")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|vision_start|>",
        "<|video_pad|>",
        "<|vision_end|>",
        "<tool_call>",
    ]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<tool_call>"


def test_processor_round_trips_offline(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded) is Qwen2_5_VLProcessor
    assert type(loaded.image_processor) is type(processor.image_processor)
    assert type(loaded.image_processor) is type(
        AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    )
    assert type(loaded.video_processor) is Qwen2VLVideoProcessor
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert token_ids(loaded.tokenizer) == token_ids(processor.tokenizer)
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    assert loaded.tokenizer.pad_token == "<|endoftext|>"
    prompt = chat_prompt(processor, "Describe the video.")
    assert chat_prompt(loaded, "Describe the video.") == prompt
    expected = processor(text=[prompt], videos=[LONG_VIDEO], return_tensors="pt")
    got = loaded(text=[prompt], videos=[LONG_VIDEO], return_tensors="pt")
    assert set(got) == set(expected) == VIDEO_INPUT_KEYS
    for key in VIDEO_INPUT_KEYS:
        assert torch.equal(got[key], expected[key]), key


def test_chat_template_and_video_expansion(processor):
    prompt = chat_prompt(processor, "Describe the video.")
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe the video."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor(text=[prompt], videos=[LONG_VIDEO], return_tensors="pt")
    ids = token_ids(processor.tokenizer)
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 4]]  # 8 frames / temporal patch 2
    video_tokens = inputs["input_ids"] == ids["video_token_id"]
    assert int(video_tokens.sum()) == 4 * 4 * 4 // 4  # one token per 2x2 merged patches
    assert torch.equal(inputs["mm_token_type_ids"] == 2, video_tokens)
    assert inputs["pixel_values_videos"].shape == (4 * 4 * 4, 3 * 2 * 14 * 14)
    # The video processor's default rate (24 fps, not sampled down) and temporal patch of 2.
    torch.testing.assert_close(inputs["second_per_grid_ts"], torch.tensor([2 / 24]))
    assert processor.tokenizer.decode(inputs["input_ids"][0]).count("<|video_pad|>") == 16


def test_default_video_processor_keys(processor):
    # Defaults as a user gets them: frames upscaled to the minimum pixel count.
    default = build_processor(processor.tokenizer)
    prompt = chat_prompt(default, "Describe the video.")
    inputs = default(text=[prompt], videos=[LONG_VIDEO], return_tensors="pt")
    assert set(inputs) == VIDEO_INPUT_KEYS
    grid = inputs["video_grid_thw"][0]
    assert grid[0] == 4 and grid[1] * grid[2] * 14 * 14 >= 128 * 28 * 28
    video_token_id = token_ids(default.tokenizer)["video_token_id"]
    assert int((inputs["input_ids"] == video_token_id).sum()) == int(grid.prod()) // 4


def test_students_are_off_their_init(models, processor):
    inputs = processor(
        text=[chat_prompt(processor, "Describe the video.")],
        videos=[LONG_VIDEO],
        return_tensors="pt",
    )
    teacher = models["teacher"]
    for name in PRESETS:
        student = models[name]
        with torch.no_grad():
            opened = student(**inputs, use_cache=False).logits
            plain = linvid.convert(teacher, name)(**inputs, use_cache=False).logits
        assert torch.isfinite(opened).all(), name
        assert not torch.allclose(opened, plain, atol=1e-3), name


def test_scene_branch_is_live(models, processor):
    # The hybrid students' cross-attention to scene tokens contributes to their logits.
    inputs = processor(
        text=[chat_prompt(processor, "Describe the video.")],
        videos=[LONG_VIDEO],
        return_tensors="pt",
    )
    student = models["qwen-rwkv-vl-25"]
    with torch.no_grad():
        opened = student(**inputs, use_cache=False).logits
        gates = [
            module.mixer.cross_attention.static_gate
            for module in student.modules()
            if isinstance(module, MixerAttention)
        ]
        saved = [gate.clone() for gate in gates]
        try:
            for gate in gates:
                gate.zero_()
            closed = student(**inputs, use_cache=False).logits
        finally:
            for gate, value in zip(gates, saved, strict=True):
                gate.copy_(value)
    assert gates and not torch.allclose(opened, closed, atol=1e-4)


def test_converted_checkpoint_directory_serves_the_processor(models, processor, tmp_path):
    # convert_checkpoint copies the processor files transformers 5 writes (tokenizer.json,
    # tokenizer_config.json, processor_config.json, chat_template.jinja) next to the student.
    teacher_directory, student_directory = tmp_path / "teacher", tmp_path / "student"
    models["teacher"].save_pretrained(teacher_directory)
    processor.save_pretrained(teacher_directory)
    convert_checkpoint(str(teacher_directory), "qwen-rwkv-vl-25", str(student_directory))
    loaded = AutoProcessor.from_pretrained(student_directory, local_files_only=True)
    student = linvid.load(student_directory).eval()
    inputs = loaded(
        text=[chat_prompt(loaded, "Describe the video.")], videos=[LONG_VIDEO], return_tensors="pt"
    )
    check_greedy_equals_one_full_forward(student, inputs)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_generate_from_processor_equals_one_full_forward(models, processor, name):
    inputs = processor(
        text=[chat_prompt(processor, "Describe the video.")],
        videos=[LONG_VIDEO],
        return_tensors="pt",
    )
    assert set(inputs) == VIDEO_INPUT_KEYS
    check_greedy_equals_one_full_forward(models[name], inputs)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_left_padded_batch_of_two_videos(models, processor, name):
    model = models[name]
    prompts = [
        chat_prompt(processor, "Describe the video."),
        chat_prompt(processor, "What happens in this clip?"),
    ]
    videos = [LONG_VIDEO, SHORT_VIDEO]
    batch = processor(text=prompts, videos=videos, padding=True, return_tensors="pt")
    assert set(batch) == VIDEO_INPUT_KEYS
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths[0] != lengths[1] and not bool(batch["attention_mask"][:, -1].eq(0).any())
    assert bool(batch["attention_mask"][:, 0].eq(0).any())  # someone is left-padded
    batched = check_greedy_equals_one_full_forward(model, batch)
    for row, (prompt, clip) in enumerate(zip(prompts, videos, strict=True)):
        alone_inputs = processor(text=[prompt], videos=[clip], return_tensors="pt")
        ((alone_tokens, alone_logits),) = check_greedy_equals_one_full_forward(model, alone_inputs)
        tokens, logits = batched[row]
        assert torch.equal(tokens, alone_tokens), row
        torch.testing.assert_close(logits, alone_logits, **TOLERANCE)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_second_per_grid_ts_sets_the_time_positions(models, processor, name):
    model = models[name]
    inputs = processor(
        text=[chat_prompt(processor, "Describe the video.")],
        videos=[LONG_VIDEO],
        return_tensors="pt",
    )
    # 4 temporal patches: 2/24 s each spaces them 1/3 of a position apart (0, 0, 0, 1 after
    # truncation), one second each 4 positions apart (tokens_per_second = 4).
    slower = dict(inputs, second_per_grid_ts=torch.tensor([1.0]))
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
        slower_logits = model(**slower, use_cache=False).logits
    assert torch.isfinite(slower_logits).all()
    if name == "teacher" or model.linear_layers != tuple(range(4)):
        # Attention layers are left: their rotary positions see the spacing.
        assert not torch.allclose(logits, slower_logits, atol=1e-4)
    else:
        # Every layer is linear: no rotary positions, so the spacing cannot matter.
        assert torch.equal(logits, slower_logits)
