"""linvid's default video path against the pipeline Qwen2.5-VL users run: qwen-vl-utils'
`process_vision_info` then HF's `Qwen2_5_VLProcessor`, on real mp4 files written here.

For each video (an odd frame count, 720p, a 1 s clip, a portrait one, 20 s at 24 fps) linvid
must pick the same frame indices, return the same uint8 pixels, and give, through
`video_to_patches`, the processor's `video_grid_thw` and `pixel_values_videos` (within 1e-5),
with `meta["second_per_grid"]` equal to the processor's `second_per_grid_ts`.

Reference choices:
- File reading. qwen-vl-utils reads files with torchcodec, decord or torchvision; none works
  here (torchcodec and decord are not installed, torchvision 0.29 has no `io.read_video`). The
  tests install `PyAVDecord`, a stand-in `decord` module backed by PyAV with the surface
  qwen-vl-utils' `_read_video_decord` uses (len, get_avg_fps, get_batch(...).asnumpy()), and
  point `get_video_reader_backend` at it: the frame range, frame count, linspace indices,
  sample fps, pixel budget, smart_resize and torchvision resize all run in qwen-vl-utils' own
  code. PyAV converts frames to RGB as linvid does, so real decord's colour conversion (which
  may round differently) is not what these tests compare.
- second_per_grid_ts. qwen-vl-utils' default `video_kwargs` ({"do_sample_frames": False,
  "fps": [sample_fps]}) does not reach the processor in transformers 5.23 / 5.24: a list
  `fps` fails the processor's kwargs validation, and a number is ignored (the metadata it
  builds has no fps, so `sampled_fps` falls back to 24 and second_per_grid_ts to 2 / 24).
  The way that gives the sampled rate is qwen-vl-utils' `return_video_metadata=True` and
  passing each video's metadata as `video_metadata` (HF's `VideoMetadata.sampled_fps` =
  len(frames_indices) / total_num_frames * fps = qwen's sample fps); the reference uses it.
"""

from __future__ import annotations

import math
import sys
import types
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from qwen_vl_utils import vision_process
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tv_functional
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
    smart_resize as processor_smart_resize_reference,
)

from linvid.models import qwen_video
from linvid.models.qwen_video import video_to_patches, video_token_count
from linvid.models.tokenizer import build_word_tokenizer
from linvid.video import io, qwen_sampling
from linvid.video.io import VideoError, iter_video_frames, load_video, plan_video, write_video

VISION = SimpleNamespace(patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
TOLERANCE = 1e-5
PROMPT = "<|vision_start|><|video_pad|><|vision_end|>describe the video"
# linvid's argument for each qwen-vl-utils per-video key.
LINVID_NAMES = {
    "fps": "fps",
    "nframes": "num_frames",
    "min_frames": "min_frames",
    "max_frames": "max_frames",
    "video_start": "start",
    "video_end": "end",
    "min_pixels": "min_pixels",
    "max_pixels": "max_pixels",
    "total_pixels": "total_pixels",
}

# name -> (frames, fps, height, width); frame i shows its number (see numbered_frames).
VIDEOS = {
    "odd_61": (61, 24, 120, 160),
    "hd_720p": (6, 24, 720, 1280),
    "one_second": (24, 24, 96, 128),
    "portrait": (15, 15, 640, 360),
    "twenty_seconds": (480, 24, 48, 64),
}


def numbered_frames(count: int, height: int, width: int) -> torch.Tensor:
    """(count, 3, H, W) uint8: coloured waves that move from frame to frame (so a resize has
    detail to get wrong) under a band across the top quarter whose first three quarter-width
    blocks are grey levels 16 * digit + 8 of the frame number's three base-16 digits."""
    y = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    x = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    t = torch.arange(count, dtype=torch.float32).view(count, 1, 1)
    red = 128 + 90 * torch.sin(x / 9 + t / 3)
    green = 128 + 90 * torch.sin(y / 7 - t / 5)
    blue = 128 + 90 * torch.sin((x + y) / 13 + t / 7)
    waves = [wave.expand(count, height, width) for wave in (red, green, blue)]
    frames = torch.stack(waves, dim=1).round().clamp(0, 255).to(torch.uint8).contiguous()
    band, block = height // 4, width // 4
    for index in range(count):
        for place, digit in enumerate((index // 256, index // 16 % 16, index % 16)):
            frames[index, :, :band, place * block : (place + 1) * block] = 16 * digit + 8
    return frames


def frame_numbers(frames: torch.Tensor) -> list[int]:
    """The numbers `numbered_frames` drew, read from (T, 3, H, W) frames of any size."""
    height, width = frames.shape[-2:]
    numbers = torch.zeros(frames.shape[0], dtype=torch.long)
    for place in range(3):
        rows = slice(round(height * 0.05), round(height * 0.2))
        columns = slice(round(width * (0.25 * place + 0.05)), round(width * (0.25 * place + 0.2)))
        level = frames[:, :, rows, columns].float().mean(dim=(1, 2, 3))
        numbers = numbers * 16 + ((level - 8) / 16).round().long()
    return numbers.tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("qwen_pipeline")
    paths = {}
    for name, (count, fps, height, width) in VIDEOS.items():
        path = folder / f"{name}.mp4"
        write_video(
            path, numbered_frames(count, height, width), fps, crf=0, options={"preset": "ultrafast"}
        )
        paths[name] = str(path)
    return paths


class PyAVDecord:
    """decord.VideoReader as qwen-vl-utils uses it (len, get_avg_fps, get_batch(indices)
    .asnumpy() giving (N, H, W, 3) uint8 RGB), backed by PyAV. Every frame is decoded up front,
    numbered by position in the stream, as decord numbers them."""

    def __init__(self, uri, ctx=None, num_threads=0):
        with av.open(uri) as container:
            stream = container.streams.video[0]
            self.fps = float(stream.average_rate)
            self.frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]

    def __len__(self):
        return len(self.frames)

    def get_avg_fps(self):
        return self.fps

    def get_batch(self, indices):
        batch = np.stack([self.frames[index] for index in indices])
        return SimpleNamespace(asnumpy=lambda: batch)


@pytest.fixture
def qwen_reader(monkeypatch):
    """qwen-vl-utils reading files through PyAVDecord (see the module docstring)."""
    module = types.ModuleType("decord")
    module.VideoReader = PyAVDecord
    module.cpu = lambda device=0: device
    monkeypatch.setitem(sys.modules, "decord", module)
    monkeypatch.setattr(vision_process, "get_video_reader_backend", lambda: "decord")


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_word_tokenizer(["describe", "the", "video"])
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )


def qwen_pipeline(path: str, processor, keys: dict, monkeypatch) -> dict:
    """What a Qwen2.5-VL user gets for `path` with per-video keys `keys`: qwen-vl-utils'
    frames (T, 3, h, w) float, metadata and sample fps, and the processor's outputs."""
    recorded = {}
    fetch_video = vision_process.fetch_video

    def recording_fetch_video(*arguments, **keywords):
        result = fetch_video(*arguments, **keywords)
        recorded["sample_fps"] = result[1]
        return result

    monkeypatch.setattr(vision_process, "fetch_video", recording_fetch_video)
    element = {"type": "video", "video": path, **keys}
    messages = [{"role": "user", "content": [element, {"type": "text", "text": "describe"}]}]
    _, video_inputs, video_kwargs = vision_process.process_vision_info(
        messages, return_video_kwargs=True, return_video_metadata=True
    )
    ((video, metadata),) = video_inputs
    inputs = processor(
        text=[PROMPT],
        videos=[video],
        video_metadata=[metadata],
        return_tensors="pt",
        **video_kwargs,
    )
    return {"video": video, "metadata": metadata, "sample_fps": recorded["sample_fps"], **inputs}


def linvid_arguments(keys: dict) -> dict:
    return {LINVID_NAMES[key]: value for key, value in keys.items()}


# ---------------------------------------------------------------------------------------------
# The full pipeline on real files

# (video, qwen-vl-utils keys, what the issue or the rules say the indices / grid must be)
PIPELINE_CASES = [
    ("odd_61", {}, {"indices": [0, 20, 40, 60]}),  # 61/24 s at 2 fps: 5.08 -> 4 frames
    ("odd_61", {"fps": 8.0}, {"count": 20}),  # 20.3 -> 20 frames, step 60/19
    ("odd_61", {"nframes": 7}, {"count": 8}),  # rounded to even (7 / 2 = 3.5 -> 4 pairs)
    ("odd_61", {"video_start": 0.4, "video_end": 2.1, "fps": 4.0}, {"range": (10, 50)}),
    ("hd_720p", {}, {"indices": [0, 2, 3, 5], "grid_hw": [40, 72]}),
    ("hd_720p", {"total_pixels": 300000.0}, {"grid_hw": [20, 36]}),  # 150000 pixels a frame
    ("hd_720p", {"max_pixels": 200000}, {"grid_hw": [22, 42]}),
    ("one_second", {}, {"indices": [0, 8, 15, 23]}),  # 2 frames at 2 fps -> at least 4
    ("portrait", {}, {"indices": [0, 5, 9, 14], "grid_hw": [46, 26]}),
    ("twenty_seconds", {"fps": 1.0}, {"count": 20, "starts": [0, 25, 50], "last": 479}),
]


@pytest.mark.parametrize(
    "name, keys, expected", PIPELINE_CASES, ids=[f"{c[0]}-{c[1]}" for c in PIPELINE_CASES]
)
def test_default_video_path_matches_qwen_vl_utils_and_the_processor(
    videos, processor, qwen_reader, monkeypatch, name, keys, expected
):
    reference = qwen_pipeline(videos[name], processor, keys, monkeypatch)
    frames, meta = load_video(videos[name], **linvid_arguments(keys))

    # Same frames: indices, content (each frame shows its number), and uint8 pixels.
    indices = meta["frame_indices"]
    assert indices == list(reference["metadata"]["frames_indices"])
    assert frame_numbers(frames) == indices
    assert frames.dtype == torch.uint8 and torch.equal(frames.float(), reference["video"])
    if "indices" in expected:
        assert indices == expected["indices"]
    if "count" in expected:
        assert len(indices) == expected["count"]
    if "starts" in expected:
        assert indices[:3] == expected["starts"] and indices[-1] == expected["last"]
    if "range" in expected:
        assert (indices[0], indices[-1]) == expected["range"] == meta["frame_range"]

    # Same time axis: qwen's sample fps, and the processor's second_per_grid_ts from it.
    assert meta["sample_fps"] == meta["fps"] == reference["sample_fps"]
    assert meta["second_per_grid"] == 2 / reference["sample_fps"]
    assert reference["second_per_grid_ts"] == pytest.approx([meta["second_per_grid"]], rel=1e-12)
    assert meta["video_metadata"]["total_num_frames"] == reference["metadata"]["total_num_frames"]

    # Same model inputs: grid, token count and pixel values.
    pixels, grid = video_to_patches(frames, VISION)
    assert torch.equal(grid, reference["video_grid_thw"])
    if "grid_hw" in expected:
        assert grid[0, 1:].tolist() == expected["grid_hw"]
    tokens = (reference["input_ids"] == processor.video_token_id).sum().item()
    assert video_token_count(grid, 2) == tokens
    difference = (pixels - reference["pixel_values_videos"]).abs().max().item()
    print(f"{name} {keys}: grid {grid.tolist()}, max |linvid - processor| = {difference:.3g}")
    assert pixels.shape == reference["pixel_values_videos"].shape
    assert difference <= TOLERANCE


@pytest.mark.parametrize("name", ["odd_61", "hd_720p", "portrait"])
def test_video_to_patches_resizes_raw_uint8_frames_as_the_pipeline(
    videos, processor, qwen_reader, monkeypatch, name
):
    # The frames qwen-vl-utils picked, at their stored size: video_to_patches must resize them
    # in uint8 as qwen-vl-utils does before the processor sees them.
    reference = qwen_pipeline(videos[name], processor, {}, monkeypatch)
    raw = PyAVDecord(videos[name]).get_batch(reference["metadata"]["frames_indices"]).asnumpy()
    raw = torch.from_numpy(raw).permute(0, 3, 1, 2)
    assert raw.shape[-2:] != reference["video"].shape[-2:]  # a resize really happens
    pixels, grid = video_to_patches(raw, VISION)
    assert torch.equal(grid, reference["video_grid_thw"])
    difference = (pixels - reference["pixel_values_videos"]).abs().max().item()
    print(f"{name} raw frames: max |linvid - processor| = {difference:.3g}")
    assert difference <= TOLERANCE


def test_linvid_metadata_gives_the_processor_the_sampled_time_axis(videos, processor):
    frames, meta = load_video(videos["odd_61"], fps=8.0)
    inputs = processor(
        text=[PROMPT],
        videos=[frames],
        video_metadata=[meta["video_metadata"]],
        do_sample_frames=False,
        return_tensors="pt",
    )
    assert inputs["second_per_grid_ts"] == pytest.approx([meta["second_per_grid"]], rel=1e-12)
    assert meta["second_per_grid"] == pytest.approx(2 / (20 / 61 * 24))


def test_iter_video_frames_streams_the_same_qwen_frames(videos):
    frames, meta = load_video(videos["odd_61"], fps=8.0, start=0.3)
    streamed = list(iter_video_frames(videos["odd_61"], fps=8.0, start=0.3))
    assert torch.equal(torch.stack([frame.pixels for frame in streamed]), frames)
    assert [frame.index for frame in streamed] == meta["frame_indices"]
    assert [frame.timestamp for frame in streamed] == meta["timestamps"]
    assert meta["timestamps"] == pytest.approx([index / 24 for index in meta["frame_indices"]])


@pytest.mark.parametrize("extension", ["mkv", "ts", "avi"])
@pytest.mark.parametrize("start", [None, 0.5])
def test_decode_indices_count_frames_in_containers_with_other_timing(tmp_path, extension, start):
    # mkv records no frame count, MPEG-TS starts at a non-zero timestamp, AVI keeps decode-order
    # timestamps; a start seeks first. The frames kept must still be those numbered so.
    path = tmp_path / f"odd.{extension}"
    write_video(path, numbered_frames(61, 48, 64), 24, crf=0)
    frames, meta = load_video(path, fps=8.0, start=start)
    expected = qwen_sampling.frame_indices(61, 24.0, fps=8.0, start=start)
    assert meta["frame_indices"] == expected and frame_numbers(frames) == expected


@pytest.mark.parametrize("sampling", io.SAMPLING_MODES)
def test_plan_video_says_what_load_video_returns_without_decoding(videos, monkeypatch, sampling):
    frames, meta = load_video(videos["odd_61"], sampling=sampling, fps=8.0, start=0.5)
    monkeypatch.setattr(io, "_timed_frames", None)  # any decoding would fail
    plan = plan_video(videos["odd_61"], sampling=sampling, fps=8.0, start=0.5)
    assert plan.keys() == meta.keys()
    for key, value in meta.items():
        if key in ("backend", "video_metadata"):
            continue
        assert plan[key] == pytest.approx(value), key
    assert plan["size"] == tuple(frames.shape[-2:])
    assert {**plan["video_metadata"], "video_backend": "pyav"} == meta["video_metadata"]


def test_timestamps_sampling_takes_min_pixels_and_leaves_it_to_the_resize(videos):
    frames, meta = load_video(videos["odd_61"], sampling="timestamps", fps=2.0, min_pixels=10**6)
    assert frames.shape == (6, 3, 120, 160) and meta["frame_indices"] == [0, 12, 24, 36, 48, 60]
    _, grid = video_to_patches(frames, VISION, min_pixels=10**6, max_pixels=2 * 10**6)
    assert grid[0, 1] * grid[0, 2] * 14 * 14 >= 10**6


def test_only_sampled_frames_are_converted_and_decoding_stops_after_the_last(videos, monkeypatch):
    converted, decoded = [], []
    to_rgb, timed_frames = io._to_rgb, io._timed_frames

    def counting_to_rgb(frame):
        converted.append(frame)
        return to_rgb(frame)

    def counting_timed_frames(*arguments, **keywords):
        for item in timed_frames(*arguments, **keywords):
            decoded.append(item)
            yield item

    monkeypatch.setattr(io, "_to_rgb", counting_to_rgb)
    monkeypatch.setattr(io, "_timed_frames", counting_timed_frames)
    _, meta = load_video(videos["odd_61"], end=1.0)  # frames 0..24, 4 of them sampled
    assert meta["frame_indices"] == [0, 8, 16, 24]
    assert len(converted) == 4 and len(decoded) == 25


def test_issue_examples_against_qwen_vl_utils_own_functions():
    # fps=1 on a 20 s 24 fps clip; a 1 s clip at the default 2 fps; a 720p frame.
    twenty = qwen_sampling.frame_indices(480, 24.0, fps=1.0)
    assert twenty[:3] == [0, 25, 50] and twenty[-1] == 479 and len(twenty) == 20
    assert qwen_sampling.frame_indices(24, 24.0) == [0, 8, 15, 23]
    assert qwen_sampling.frame_size(720, 1280, 4) == (560, 1008)  # grid 40 x 72
    assert qwen_sampling.smart_resize(720, 1280) == vision_process.smart_resize(
        720, 1280, 28, qwen_sampling.VIDEO_MIN_PIXELS, qwen_sampling.VIDEO_MAX_PIXELS
    )


# ---------------------------------------------------------------------------------------------
# The rules one by one against qwen-vl-utils' and HF's functions

INDEX_CASES = [
    (61, 24.0, {}),
    (61, 24.0, {"fps": 8.0}),
    (37, 24.0, {"fps": 2.0}),
    (480, 24.0, {"fps": 1.0}),
    (24, 24.0, {}),
    (3, 30.0, {}),
    (61, 24.0, {"nframes": 7}),
    (61, 24.0, {"nframes": 5}),
    (61, 24.0, {"nframes": 61}),
    (1001, 29.97, {"fps": 0.5, "min_frames": 5, "max_frames": 9}),
    (1001, 29.97, {"fps": 30.0, "max_frames": 101}),
    (100000, 30.0, {}),
    (61, 24.0, {"video_start": 0.4, "video_end": 2.1}),
    (61, 24.0, {"video_start": 1.0}),
    (61, 24.0, {"video_end": 100.0, "fps": 3.0}),
    (7201, 23.976, {"video_start": 12.3, "video_end": 250.7, "fps": 0.7}),
]


@pytest.mark.parametrize("total_frames, video_fps, keys", INDEX_CASES)
def test_frame_indices_and_sample_fps_match_qwen_vl_utils(total_frames, video_fps, keys):
    # The index line of qwen-vl-utils' decord reader, with its own functions.
    first, last, span = vision_process.calculate_video_frame_range(keys, total_frames, video_fps)
    count = vision_process.smart_nframes(keys, total_frames=span, video_fps=video_fps)
    expected = torch.linspace(first, last, count).round().long().tolist()
    arguments = {LINVID_NAMES[key]: value for key, value in keys.items()}
    plan = qwen_sampling.plan_sampling(total_frames, video_fps, 720, 1280, **arguments)
    assert plan.frame_indices == expected
    assert qwen_sampling.frame_indices(total_frames, video_fps, **arguments) == expected
    assert (plan.first, plan.last) == (first, last)
    assert plan.sample_fps == count / span * video_fps
    assert plan.second_per_grid == 2 / plan.sample_fps
    assert plan.size == qwen_sampling.frame_size(720, 1280, count)


@pytest.mark.parametrize(
    "total_frames, keys",
    [(1, {}), (61, {"nframes": 100}), (61, {"nframes": 1}), (61, {"video_start": 10.0})],
)
def test_frame_counts_qwen_vl_utils_rejects_are_value_errors(total_frames, keys):
    with pytest.raises(ValueError):
        first, last, span = vision_process.calculate_video_frame_range(keys, total_frames, 24.0)
        vision_process.smart_nframes(keys, total_frames=span, video_fps=24.0)
    arguments = {LINVID_NAMES[key]: value for key, value in keys.items()}
    with pytest.raises(ValueError, match="frames"):
        qwen_sampling.frame_indices(total_frames, 24.0, **arguments)


SIZES = [(h, w) for h in (1, 10, 14, 15, 28, 41, 100, 360, 720, 1080) for w in (14, 56, 500, 1280)]
PIXEL_RANGES = [
    (qwen_sampling.VIDEO_MIN_PIXELS, qwen_sampling.VIDEO_MAX_PIXELS),
    (0, 4 * 28 * 28),
    (1568, 10**9),
    (28 * 28, 4 * 28 * 28),
    (qwen_sampling.VIDEO_MIN_PIXELS, 235200.0),  # the budget of 768 frames: a float
]


@pytest.mark.parametrize("min_pixels, max_pixels", PIXEL_RANGES)
def test_smart_resize_is_qwen_vl_utils_and_processor_smart_resize_is_hfs(min_pixels, max_pixels):
    compared = 0
    for height, width in SIZES:
        if max(height, width) / min(height, width) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                qwen_sampling.smart_resize(height, width, 28, min_pixels, max_pixels)
            continue
        ours = qwen_sampling.smart_resize(height, width, 28, min_pixels, max_pixels)
        theirs = vision_process.smart_resize(height, width, 28, min_pixels, max_pixels)
        if 0 not in theirs:  # qwen-vl-utils' size is usable (its resize fails on a 0 side)
            assert ours == theirs, (height, width)
            compared += 1
        processor_size = processor_smart_resize_reference(height, width, 28, min_pixels, max_pixels)
        assert qwen_sampling.processor_smart_resize(height, width, 28, min_pixels, max_pixels) == (
            processor_size
        )
        if min_pixels > 78400:  # the two rules agree here (see smart_resize's docstring)
            assert ours == processor_size
        if 0 not in ours and min_pixels <= ours[0] * ours[1] <= max_pixels:
            # The pipeline's second resize, the processor's, keeps a size that fits.
            assert qwen_sampling.processor_smart_resize(*ours, 28, min_pixels, max_pixels) == ours
    assert compared >= 20


def test_the_two_smart_resize_rules_differ_only_on_sides_of_at_most_14_pixels():
    assert qwen_sampling.smart_resize(10, 60, 28, 1568, 10**9) == (28, 56)
    assert qwen_sampling.processor_smart_resize(10, 60, 28, 1568, 10**9) == (28, 112)
    assert processor_smart_resize_reference(10, 60, 28, 1568, 10**9) == (28, 112)
    assert qwen_sampling.smart_resize(15, 60, 28, 1568, 10**9) == (28, 56)
    assert qwen_sampling.processor_smart_resize(15, 60, 28, 1568, 10**9) == (28, 56)
    assert qwen_video.smart_resize is qwen_sampling.smart_resize  # the name callers import


def test_frame_pixel_budget_is_fetch_videos_per_frame_max_pixels():
    assert qwen_sampling.frame_pixel_budget(4) == qwen_sampling.VIDEO_MAX_PIXELS
    assert qwen_sampling.frame_pixel_budget(300) == qwen_sampling.VIDEO_MAX_PIXELS
    assert qwen_sampling.frame_pixel_budget(768) == pytest.approx(128000 * 784 * 0.9 * 2 / 768)
    assert qwen_sampling.frame_pixel_budget(10**5) == int(qwen_sampling.VIDEO_MIN_PIXELS * 1.05)
    assert qwen_sampling.frame_pixel_budget(4, max_pixels=200000) == 200000
    assert qwen_sampling.frame_size(720, 1280, 768) == (336, 644)  # 235200-pixel budget


@pytest.mark.parametrize(
    "shape, size",
    [
        ((4, 3, 720, 1280), (560, 1008)),  # shrink
        ((3, 3, 120, 160), (280, 392)),  # grow
        ((2, 3, 640, 360), (644, 364)),  # barely grow
        ((3, 120, 161), (57, 85)),  # one frame, odd sizes
    ],
)
def test_resize_frames_is_bit_identical_to_torchvision_uint8_bicubic(shape, size):
    generator = torch.Generator().manual_seed(sum(shape))
    frames = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    if frames.ndim == 4:  # (T, H, W, 3) made (T, 3, H, W) as qwen-vl-utils does with decord's
        frames = frames.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    expected = tv_functional.resize(
        frames, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    resized = qwen_sampling.resize_frames(frames, size)
    assert resized.dtype == torch.uint8 and torch.equal(resized, expected)
    if frames.ndim == 4:  # frame by frame, as linvid decodes, gives the stack's values
        one_by_one = torch.stack([qwen_sampling.resize_frames(frame, size) for frame in frames])
        assert torch.equal(one_by_one, expected)
    assert qwen_sampling.resize_frames(frames, tuple(frames.shape[-2:])) is frames


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: qwen_sampling.smart_resize(100, 100, 28, 10**6, 10**5), "min_pixels"),
        (lambda: qwen_sampling.smart_resize(0, 100), "height"),
        (lambda: qwen_sampling.smart_resize(1, 500), "aspect ratio"),
        (lambda: qwen_sampling.smart_nframes(61, 24.0, fps=0), "fps"),
        (lambda: qwen_sampling.smart_nframes(61, 24.0, fps=-1.0), "fps"),
        (lambda: qwen_sampling.smart_nframes(61, 24.0, fps=2.0, num_frames=4), "num_frames"),
        (lambda: qwen_sampling.smart_nframes(61, 0.0), "video_fps"),
        (lambda: qwen_sampling.smart_nframes(61, 24.0, min_frames=0), "min_frames"),
        (lambda: qwen_sampling.frame_range(61, 24.0, start=math.nan), "start"),
        (lambda: qwen_sampling.frame_range(0, 24.0), "total_frames"),
        (lambda: qwen_sampling.frame_pixel_budget(4, max_pixels=1000), "min_pixels"),
        (lambda: qwen_sampling.frame_pixel_budget(0), "num_frames"),
        (lambda: qwen_sampling.sample_fps(4, 0, 24.0), "span_frames"),
        (lambda: qwen_sampling.resize_frames(torch.zeros(3, 8, 8), (4, 4)), "uint8"),
    ],
)
def test_qwen_sampling_rejects_bad_arguments_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize(
    "arguments, name",
    [
        ({"max_pixels": 1000}, "max_pixels"),  # below the default min_pixels
        ({"min_pixels": -1}, "min_pixels"),
        ({"total_pixels": 0}, "total_pixels"),
        ({"min_frames": 0}, "min_frames"),
        ({"num_frames": 100}, "100 frames"),
        ({"sampling": "nearest"}, "sampling"),
        ({"sampling": "timestamps", "min_frames": 4}, "min_frames"),
        ({"sampling": "timestamps", "total_pixels": 10**6}, "total_pixels"),
    ],
)
def test_load_video_rejects_bad_qwen_arguments_naming_them(videos, arguments, name):
    with pytest.raises(ValueError, match=name) as caught:
        load_video(videos["odd_61"], **arguments)
    assert not isinstance(caught.value, VideoError)


def test_a_one_frame_video_is_a_video_error_under_qwen_sampling(tmp_path):
    path = tmp_path / "still.mp4"
    write_video(path, numbered_frames(1, 48, 64), 24, crf=0)
    with pytest.raises(VideoError, match="1 frame.*timestamps") as caught:
        load_video(path)
    assert str(path) in str(caught.value)
    frames, _ = load_video(path, sampling="timestamps")
    assert frame_numbers(frames) == [0]
