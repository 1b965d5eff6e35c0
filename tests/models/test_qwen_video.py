"""Frames to Qwen2.5-VL patches: sizes, normalisation and the processor's patch layout."""

import pytest
import torch

from linvid.models.qwen_video import (
    CLIP_MEAN,
    CLIP_STD,
    PIXEL_STATISTICS_KEY,
    pixel_statistics,
    smart_resize,
    video_to_patches,
    video_token_count,
)
from linvid.models.tiny import tiny_qwen2_5_vl_config

VISION = tiny_qwen2_5_vl_config().vision_config  # patch 14, temporal 2, merge 2


def test_smart_resize_keeps_multiples_and_pixel_bounds():
    assert smart_resize(56, 112, 28, 0, 10**9) == (56, 112)
    height, width = smart_resize(720, 1280, 28, 128 * 28 * 28, 768 * 28 * 28)
    assert height % 28 == 0 and width % 28 == 0
    assert 128 * 28 * 28 <= height * width <= 768 * 28 * 28
    assert abs(width / height - 1280 / 720) < 0.1
    assert smart_resize(10, 10, 28, 56 * 56, 10**9) == (56, 56)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 500)


def test_patch_layout_matches_the_processor_order():
    # Encode (t, c, y, x) in every pixel so each patch value says where it came from.
    frames, channels, height, width = 4, 3, 56, 56
    t, c, y, x = torch.meshgrid(
        *(torch.arange(size) for size in (frames, channels, height, width)), indexing="ij"
    )
    code = (((t * channels + c) * height + y) * width + x).float()
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    # Undo the normalisation the function applies to float input in [0, 1].
    pixels, grid = video_to_patches(code, VISION, resize=False)
    decoded = pixels.view(-1, 3, 2, 14, 14) * std.view(1, 3, 1, 1, 1) + mean.view(1, 3, 1, 1, 1)
    decoded = decoded.round().long()
    assert grid.tolist() == [[2, 4, 4]]
    row = 0
    for grid_t in range(2):
        for block_y in range(2):
            for block_x in range(2):
                for in_y in range(2):
                    for in_x in range(2):
                        patch_y, patch_x = block_y * 2 + in_y, block_x * 2 + in_x
                        for channel in range(3):
                            for step in range(2):
                                frame = grid_t * 2 + step
                                top, left = patch_y * 14, patch_x * 14
                                expected = code[frame, channel, top : top + 14, left : left + 14]
                                got = decoded[row, channel, step]
                                assert torch.equal(got, expected.long()), (row, channel, step)
                        row += 1
    assert row == pixels.shape[0]


def test_uint8_frames_are_scaled_normalised_and_padded_in_time():
    frames = torch.full((3, 3, 56, 56), 255, dtype=torch.uint8)
    pixels, grid = video_to_patches(frames, VISION)
    assert grid.tolist()[0][0] == 2  # 3 frames -> last repeated -> 2 temporal patches
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    means = pixels.view(-1, 3, 2 * 14 * 14).mean(dim=(0, 2))
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-4)
    assert video_token_count(grid, 2) == pixels.shape[0] // 4


def test_frames_are_resized_to_the_configured_pixel_range():
    frames = torch.randint(0, 256, (2, 3, 90, 160), dtype=torch.uint8)
    pixels, grid = video_to_patches(frames, VISION, min_pixels=28 * 28, max_pixels=4 * 28 * 28)
    _, h, w = grid.tolist()[0]
    assert h * w * 14 * 14 <= 4 * 28 * 28 and h % 2 == 0 and w % 2 == 0
    assert pixels.shape == (h * w, 3 * 2 * 14 * 14)


def test_bad_frames_are_clear_errors():
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        video_to_patches(torch.zeros(2, 56, 56), VISION)
    with pytest.raises(ValueError, match="no frames"):
        video_to_patches(torch.zeros(0, 3, 56, 56), VISION)
    with pytest.raises(ValueError, match="divisible by 28"):
        video_to_patches(torch.zeros(2, 3, 50, 56), VISION, resize=False)


def test_pixel_statistics_come_from_the_config_else_clip():
    config = tiny_qwen2_5_vl_config()
    assert pixel_statistics(config) == (CLIP_MEAN, CLIP_STD)
    setattr(config, PIXEL_STATISTICS_KEY, {"mean": [0.5] * 3, "std": [0.5] * 3})
    mean, std = pixel_statistics(config)
    frames = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 56, 56)
    pixels, _ = video_to_patches(frames, VISION, resize=False, mean=mean, std=std)
    # One temporal patch: frame 0 (black) then frame 1 (white) in every row, per channel.
    rows = pixels.view(-1, 3, 2, 14 * 14)
    assert torch.equal(rows[:, :, 0], torch.full_like(rows[:, :, 0], -1.0))
    assert torch.equal(rows[:, :, 1], torch.full_like(rows[:, :, 1], 1.0))
