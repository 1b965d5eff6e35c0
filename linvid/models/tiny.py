"""Small Qwen2.5-VL configs built offline, for tests, demos and benchmarks (the real classes
and code paths, a few layers and a narrow width)."""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig

# Placeholder token ids inside a small vocabulary.
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 60, 61, 62, 63


def tiny_qwen2_5_vl_config(
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 64,
    vision_hidden_size: int = 32,
    vision_depth: int = 1,
    window_size: int = 56,
    fullatt_block_indexes: tuple[int, ...] = (0,),
    mrope_section: tuple[int, int, int] | None = None,
    attention_implementation: str = "sdpa",
    token_ids: dict | None = None,
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config with `num_layers` decoder layers of width `hidden_size`; patch 14,
    temporal patch 2, spatial merge 2 (a 56x56 frame pair is 4 LLM tokens).

    token_ids: vocab_size and the special token ids from a tokenizer
    (`linvid.models.tokenizer.token_ids`); by default a 64-word vocabulary whose last four ids
    are the image, video, vision-start and vision-end tokens. mrope_section: the (temporal,
    height, width) split of head_dim / 2 rotary frequencies; by default about half temporal.
    vision_depth, window_size, fullatt_block_indexes: the vision tower's blocks, its window
    attention's size in pixels and the blocks that attend over the whole frame."""
    ids = {
        "vocab_size": vocab_size,
        "image_token_id": IMAGE_TOKEN,
        "video_token_id": VIDEO_TOKEN,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    ids.update(token_ids or {})
    special = {key: ids[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    head_dim = hidden_size // num_heads
    # M-RoPE splits head_dim / 2 rotary frequencies into (temporal, height, width) sections.
    if mrope_section is None:
        quarter = head_dim // 2 // 4
        mrope_section = [head_dim // 2 - 2 * quarter, quarter, quarter]
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(
            f"mrope_section {mrope_section} must sum to head_dim / 2 = {head_dim // 2}"
        )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": ids["vocab_size"],
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_key_value_heads,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": list(mrope_section),
            },
            **special,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": window_size,
            "fullatt_block_indexes": list(fullatt_block_indexes),
        },
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        **special,
    )
    config._attn_implementation = attention_implementation
    return config
