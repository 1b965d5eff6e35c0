"""`AnswerEncoder` and `frames_tensor` (linvid/eval/options.py) in the cases the mutation run
(docs/mutation.md) found unguarded: frames given as a torch tensor, the shape check and its
message, the frames' own size by default and Qwen's resize (without its minimum size) on
request, the frame rate given, a checkpoint's processor actually making the pixels, the pad
token of the batch, and an answer without tokens."""

import re

import numpy as np
import pytest
import torch

from linvid.distill.data import IGNORE_INDEX
from linvid.eval.options import AnswerEncoder, frames_tensor
from linvid.models.processor import build_bpe_tokenizer, build_processor, token_ids
from linvid.models.tiny import tiny_qwen2_5_vl_config


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_bpe_tokenizer(["what colour is the circle?", "red green"] * 4))


@pytest.fixture(scope="module")
def config(processor):
    return tiny_qwen2_5_vl_config(num_layers=1, token_ids=token_ids(processor.tokenizer))


def random_frames(count: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_frames_tensor_takes_numpy_and_torch_and_names_a_wrong_shape():
    frames = random_frames(3, 4, 6)
    expected = torch.from_numpy(frames).permute(0, 3, 1, 2)
    assert torch.equal(frames_tensor(frames), expected)
    assert torch.equal(frames_tensor(torch.from_numpy(frames)), expected)
    for shape in ((2, 8, 8, 4), (8, 8, 3)):
        message = re.escape(f"frames must be (T, H, W, 3), got shape {shape}")
        with pytest.raises(ValueError, match=f"^{message}$"):
            frames_tensor(np.zeros(shape, dtype=np.uint8))


def test_frames_keep_their_size_unless_resize_is_asked(processor, config):
    """60x100 frames are not a multiple of 28 (patch 14 x merge 2): refused by default;
    resize=True rounds them to 56x112 as Qwen's smart_resize does, without its minimum of
    100352 pixels (which would blow them up to 252x420)."""
    frames = random_frames(7, 60, 100)
    with pytest.raises(ValueError, match="divisible by 28 when resize=False"):
        AnswerEncoder(processor.tokenizer, config).video(frames)
    resized = AnswerEncoder(processor.tokenizer, config, resize=True).video(frames)
    assert resized["video_grid_thw"].tolist() == [[4, 4, 8]]
    own = AnswerEncoder(processor.tokenizer, config).video(random_frames(7, 56, 112))
    assert own["video_grid_thw"].tolist() == [[4, 4, 8]]


def test_the_frame_rate_sets_the_seconds_per_temporal_patch(processor, config):
    frames = random_frames(4, 56, 56)
    default = AnswerEncoder(processor.tokenizer, config).video(frames)
    slow = AnswerEncoder(processor.tokenizer, config, sample_fps=0.5).video(frames)
    assert default["second_per_grid_ts"].tolist() == [1.0]  # temporal patch 2 / 2 fps
    assert slow["second_per_grid_ts"].tolist() == [4.0]


def test_a_given_processor_makes_the_pixels(processor, config):
    calls = []

    class CountingVideoProcessor:
        size = processor.video_processor.size

        def __call__(self, **kwargs):
            calls.append(kwargs)
            return processor.video_processor(**kwargs)

    class Processor:
        video_processor = CountingVideoProcessor()

    frames = random_frames(4, 56, 112)
    encoder = AnswerEncoder(processor.tokenizer, config, processor=Processor())
    pixels = encoder.video(frames)["pixel_values_videos"]
    assert len(calls) == 1 and calls[0]["do_resize"] is False
    own = AnswerEncoder(processor.tokenizer, config).video(frames)["pixel_values_videos"]
    torch.testing.assert_close(pixels, own, rtol=0, atol=1e-5)


def test_items_and_batches(processor, config):
    encoder = AnswerEncoder(processor.tokenizer, config)
    video = encoder.video(random_frames(2, 56, 56))
    short = encoder.item("what colour is the circle?", "red", video, end_of_turn=False)
    long = encoder.item("what colour is the circle?", "red green red", video, end_of_turn=False)
    assert short["sample_index"] == 0 and short["video_key"] == ""
    batch = encoder.batch([short, long])
    pad = processor.tokenizer.pad_token_id
    assert pad != 0
    padding = len(long["input_ids"]) - len(short["input_ids"])
    assert padding > 0
    assert batch["input_ids"][0, len(short["input_ids"]) :].tolist() == [pad] * padding
    assert batch["labels"][0, len(short["input_ids"]) :].tolist() == [IGNORE_INDEX] * padding
    with pytest.raises(ValueError, match=r"^answer '' has no tokens$"):
        encoder.answer_ids("")
