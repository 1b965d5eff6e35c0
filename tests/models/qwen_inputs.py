"""Tiny Qwen2.5-VL teachers and video inputs built offline, through the real video code path
(pixel_values_videos, video_grid_thw, mm_token_type_ids)."""

import torch

from linvid.models.tiny import VIDEO_TOKEN, VISION_END, VISION_START

PATCH_VALUES = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch


def video_sample(frames=4, height=56, width=112, prefix=(3, 4, 5), suffix=(6, 7, 8), seed=0):
    """One video between text tokens: (input_ids (L,), pixel rows (P, 1176), grid (3,))."""
    generator = torch.Generator().manual_seed(seed)
    t, h, w = frames // 2, height // 14, width // 14
    pixels = torch.randn(t * h * w, PATCH_VALUES, generator=generator)
    tokens = t * (h // 2) * (w // 2)
    ids = [*prefix, VISION_START, *([VIDEO_TOKEN] * tokens), VISION_END, *suffix]
    return torch.tensor(ids), pixels, torch.tensor([t, h, w])


def batch_inputs(samples, pad_token=2):
    """Left-pad samples from video_sample into one batch of model inputs."""
    longest = max(ids.shape[0] for ids, _, _ in samples)
    input_ids, attention_mask = [], []
    for ids, _, _ in samples:
        padding = longest - ids.shape[0]
        input_ids.append(torch.cat([torch.full((padding,), pad_token), ids]))
        attention_mask.append(torch.cat([torch.zeros(padding), torch.ones(ids.shape[0])]))
    input_ids = torch.stack(input_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.stack(attention_mask).long(),
        "pixel_values_videos": torch.cat([pixels for _, pixels, _ in samples]),
        "video_grid_thw": torch.stack([grid for _, _, grid in samples]),
        "mm_token_type_ids": (input_ids == VIDEO_TOKEN).int() * 2,
    }
