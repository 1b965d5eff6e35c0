"""`ask` fed as a Qwen2.5-VL user feeds a model: a real Qwen2_5_VLProcessor (built offline),
the streamed prefill against the processor's whole-video inputs, and greedy decoding whatever
the checkpoint's generation_config asks for."""

import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.cli import main
from linvid.eval.ask import VideoPromptEncoder, ask, greedy_generation, streaming_inputs
from linvid.models.processor import build_bpe_tokenizer, build_processor, token_ids
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.video.io import write_video

QUESTION = "what color is the circle?"
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 56 * 112}
PROCESSOR_KEYS = {
    "input_ids",
    "attention_mask",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "mm_token_type_ids",
}


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_bpe_tokenizer([QUESTION, "red green blue yellow circle square"] * 4)
    return build_processor(tokenizer)


@pytest.fixture(scope="module")
def teacher(processor):
    torch.manual_seed(0)
    config = tiny_qwen2_5_vl_config(num_layers=2, token_ids=token_ids(processor.tokenizer))
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def frames():
    """7 frames (an odd count: the last temporal patch repeats the last frame) of 56x112."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (7, 3, 56, 112), generator=generator, dtype=torch.uint8)


def test_streamed_calls_hold_exactly_the_processors_whole_video_inputs(teacher, processor, frames):
    student = linvid.convert(teacher, "rwkv6-all")
    encoder = VideoPromptEncoder(student, None, processor, **PIXELS)
    whole = encoder.whole(frames, QUESTION, "standard", sample_fps=1.0)
    assert set(whole) == PROCESSOR_KEYS
    assert whole["second_per_grid_ts"].tolist() == [2.0]  # temporal patch 2 / 1 fps

    chunks = [frames[:2], frames[2:6], frames[6:]]
    calls = list(streaming_inputs(student, encoder, chunks, QUESTION, "standard", 1.0))
    assert len(calls) == 2 + len(chunks)
    ids = torch.cat([call["input_ids"] for call in calls], dim=1)
    assert torch.equal(ids, whole["input_ids"])
    video_calls = [call for call in calls if "pixel_values_videos" in call]
    pixels = torch.cat([call["pixel_values_videos"] for call in video_calls])
    assert torch.equal(pixels, whole["pixel_values_videos"])
    grids = torch.cat([call["video_grid_thw"] for call in video_calls])
    assert grids[:, 0].sum() == whole["video_grid_thw"][0, 0] == 4  # 7 frames: 4 pairs
    assert (grids[:, 1:] == whole["video_grid_thw"][:, 1:]).all()
    for call in video_calls:
        assert torch.equal(call["second_per_grid_ts"], whole["second_per_grid_ts"])

    positions, _ = teacher.model.get_rope_index(
        whole["input_ids"],
        mm_token_type_ids=whole["mm_token_type_ids"],
        video_grid_thw=whole["video_grid_thw"],
        second_per_grid_ts=whole["second_per_grid_ts"],
        attention_mask=whole["attention_mask"],
    )
    streamed = torch.cat([call["position_ids"] for call in calls], dim=-1)
    assert torch.equal(streamed, positions)
    # The temporal positions advance by tokens_per_second * second_per_grid per frame pair.
    video = whole["input_ids"][0] == teacher.config.video_token_id
    temporal = positions[0, 0, video].unique()
    step = teacher.config.vision_config.tokens_per_second * 2.0
    assert temporal.numel() == 4 and (temporal.diff() == step).all()


def test_linvid_video_inputs_equal_the_processors(teacher, processor, frames):
    with_processor = VideoPromptEncoder(teacher, None, processor, **PIXELS)
    without = VideoPromptEncoder(teacher, processor.tokenizer, None, **PIXELS)
    expected = with_processor.whole(frames, QUESTION, "sandwich", sample_fps=0.5)
    got = without.whole(frames, QUESTION, "sandwich", sample_fps=0.5)
    assert set(got) == PROCESSOR_KEYS
    for key in ("input_ids", "attention_mask", "video_grid_thw", "mm_token_type_ids"):
        assert torch.equal(got[key].long(), expected[key].long()), key
    assert torch.allclose(got["second_per_grid_ts"].float(), expected["second_per_grid_ts"])
    difference = (got["pixel_values_videos"] - expected["pixel_values_videos"]).abs().max()
    assert difference < 1e-5


def _argmax_continuation(model, inputs, count):
    """Greedy tokens by repeated full forwards (no cache): the definition of greedy."""
    ids = inputs["input_ids"]
    types = inputs["mm_token_type_ids"]
    tokens = []
    for _ in range(count):
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                mm_token_type_ids=types,
                pixel_values_videos=inputs["pixel_values_videos"],
                video_grid_thw=inputs["video_grid_thw"],
                second_per_grid_ts=inputs["second_per_grid_ts"],
                use_cache=False,
            ).logits
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        types = torch.cat([types, torch.zeros_like(types[:, :1])], dim=1)
    return tokens


def test_greedy_on_both_paths_whatever_the_generation_config(teacher, processor, frames):
    student = linvid.convert(teacher, "rwkv6-all")
    tokenizer = processor.tokenizer
    inputs = VideoPromptEncoder(student, None, processor, **PIXELS).whole(
        frames, QUESTION, "standard", sample_fps=1.0
    )
    count = 8
    expected = _argmax_continuation(student, inputs, count)
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert not stops & set(expected), "pick another seed: the greedy answer ends early"
    # A checkpoint's config that changes the tokens when generate() applies it: Qwen2.5-VL's
    # sampling settings and repetition penalty, and a suppressed token (the third greedy one).
    config = student.generation_config
    config.do_sample, config.top_k, config.top_p, config.temperature = True, 1, 0.001, 0.1
    config.repetition_penalty, config.suppress_tokens = 1.05, [expected[2]]
    torch.manual_seed(0)
    applied = student.generate(**inputs, max_new_tokens=count)[0, inputs["input_ids"].shape[1] :]
    assert applied.tolist() != expected, "the config must matter for this test to mean much"

    common = {"max_new_tokens": count, "processor": processor, "sample_fps": 1.0, **PIXELS}
    whole = ask(student, tokenizer, frames, QUESTION, stream=False, **common)
    streamed = ask(student, tokenizer, [frames[:4], frames[4:]], QUESTION, **common)
    assert streamed.streamed and not whole.streamed
    assert whole.new_tokens == streamed.new_tokens == expected
    assert student.generation_config is config and config.repetition_penalty == 1.05
    with greedy_generation(student, tokenizer) as greedy:
        assert greedy.repetition_penalty is None and greedy.eos_token_id == [tokenizer.eos_token_id]


def test_ask_command_uses_the_model_directorys_processor(tmp_path, teacher, processor, capsys):
    student = linvid.convert(teacher, "rwkv6-all")
    with_processor, tokenizer_only = tmp_path / "with_processor", tmp_path / "tokenizer_only"
    for directory in (with_processor, tokenizer_only):
        student.save_pretrained(directory)
    processor.save_pretrained(with_processor)
    processor.tokenizer.save_pretrained(tokenizer_only)
    video = tmp_path / "clip.mp4"
    generator = torch.Generator().manual_seed(2)
    write_video(
        video, torch.randint(0, 256, (9, 3, 56, 112), generator=generator, dtype=torch.uint8), fps=4
    )
    results = {}
    for directory in (with_processor, tokenizer_only):
        arguments = [str(video), QUESTION, "--model", str(directory), "--json"]
        arguments += ["--min-pixels", "3136", "--max-pixels", "6272", "--max-new-tokens", "4"]
        assert main(["ask", *arguments]) == 0
        results[directory.name] = json.loads(capsys.readouterr().out)
    assert results["with_processor"]["processor"] == "Qwen2_5_VLProcessor"
    assert results["tokenizer_only"]["processor"] is None
    # 9 frames at 4 fps sampled at 1 fps the qwen-vl-utils way: 4 frames (its minimum), a
    # sample rate of 4 / 9 x 4 fps.
    for result in results.values():
        assert result["counts"]["frames"] == 4
        assert result["sample_fps"] == pytest.approx(4 / 9 * 4)
    assert results["with_processor"]["new_tokens"] == results["tokenizer_only"]["new_tokens"]
