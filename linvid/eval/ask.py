"""Answer a question about a video with a Qwen2.5-VL-style model: a teacher, or a linvid
student.

Two ways to read the video:
  - whole: every sampled frame through the vision tower at once, then `generate()` (any model);
  - streaming: the video in chunks of frames, each chunk's visual tokens prefilled with the
    recurrent state carried over, then greedy decoding from that state. Only for students
    whose every layer is a causal linear mixer (RWKV-6, Mamba-2): their state has a fixed
    size, so peak memory does not grow with the video. Attention keeps every token's keys and
    values, and M-MATE's reverse direction needs all of a video's tokens at once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from linvid.eval.prompts import VIDEO_PLACEHOLDER, render_video_prompt, video_messages
from linvid.models.cache import cache_keyword
from linvid.models.qwen2_5_vl import LinvidQwen2_5_VLForConditionalGeneration
from linvid.models.qwen_video import (
    MAX_PIXELS,
    MIN_PIXELS,
    pixel_statistics,
    video_to_patches,
    video_token_count,
)

STREAMING_MIXERS = ("rwkv6", "mamba2")


@dataclass
class Answer:
    """An answer with what it cost: seconds per phase and token counts."""

    text: str
    new_tokens: list[int]
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    streamed: bool = False


def can_stream(model) -> bool:
    """Whether `model` can prefill a video chunk by chunk with a fixed-size state."""
    if not isinstance(model, LinvidQwen2_5_VLForConditionalGeneration):
        return False
    plan = model.plan
    return plan.mixer in STREAMING_MIXERS and len(model.linear_layers) == (
        model.config.text_config.num_hidden_layers
    )


def ask(
    model,
    tokenizer,
    frames: torch.Tensor | Iterable[torch.Tensor],
    question: str,
    *,
    style: str = "standard",
    max_new_tokens: int = 32,
    stream: bool | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    tokens_per_frame: int | None = None,
) -> Answer:
    """Greedy answer of `model` to `question` about a video.

    frames: (T, 3, H, W) uint8, or an iterable of such chunks (each a whole number of temporal
    patches, e.g. 2 frames for Qwen2.5-VL, except the last) for streaming. style: "standard"
    or "sandwich" (paper 001 §3.2.3). stream: None picks streaming when the model can
    (`can_stream`); True requires it. tokens_per_frame: merge each frame's vision tokens
    down to this many after the vision tower (ToMe, paper 002 §3.1; whole-video mode only).
    """
    stream = can_stream(model) if stream is None else stream
    if stream and not can_stream(model):
        raise ValueError(
            "streaming prefill needs a linvid student whose every layer is a causal linear "
            f"mixer ({', '.join(STREAMING_MIXERS)}); this model has attention or M-MATE layers"
        )
    if stream and tokens_per_frame is not None:
        raise ValueError("tokens_per_frame (per-frame ToMe) needs the whole video: stream=False")
    if stream:
        chunks = [frames] if isinstance(frames, torch.Tensor) else frames
        return _ask_streaming(
            model, tokenizer, chunks, question, style, max_new_tokens, min_pixels, max_pixels
        )
    if not isinstance(frames, torch.Tensor):
        frames = torch.cat(list(frames))
    return _ask_whole(
        model,
        tokenizer,
        frames,
        question,
        style,
        max_new_tokens,
        min_pixels,
        max_pixels,
        tokens_per_frame,
    )


def _ask_whole(
    model,
    tokenizer,
    frames,
    question,
    style,
    max_new_tokens,
    min_pixels,
    max_pixels,
    tokens_per_frame,
):
    started = time.perf_counter()
    config = model.config
    statistics = dict(zip(("mean", "std"), pixel_statistics(config), strict=True))
    pixels, grid = video_to_patches(
        frames, config.vision_config, min_pixels=min_pixels, max_pixels=max_pixels, **statistics
    )
    if tokens_per_frame is None:
        video_tokens = video_token_count(grid, config.vision_config.spatial_merge_size)
        ids = render_video_prompt(tokenizer, video_messages(question, style=style), video_tokens)
        input_ids = torch.tensor([ids], device=model.device)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values_videos": pixels.to(model.device, model.dtype),
            "video_grid_thw": grid.to(model.device),
            "mm_token_type_ids": (input_ids == config.video_token_id).int() * 2,
        }
    else:
        from linvid.models.frame_tome import compressed_video_inputs

        with torch.no_grad():
            inputs, merged = compressed_video_inputs(
                model,
                tokenizer,
                pixels.to(model.device, model.dtype),
                grid.to(model.device),
                question,
                tokens_per_frame=tokens_per_frame,
                style=style,
            )
        input_ids = inputs["input_ids"]
        video_tokens = merged.num_tokens
    prepared = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    finished = time.perf_counter()
    new_tokens = output[0, input_ids.shape[1] :].tolist()
    return Answer(
        text=tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
        new_tokens=new_tokens,
        seconds={"preprocess": prepared - started, "generate": finished - prepared},
        counts={
            "frames": frames.shape[0],
            "video_tokens": video_tokens,
            "prompt_tokens": input_ids.shape[1],
            "new_tokens": len(new_tokens),
        },
    )


def _prompt_pieces(tokenizer, question, style) -> tuple[list[int], list[int]]:
    """Token ids before and after the video placeholder of the chat prompt."""
    ids = render_video_prompt(tokenizer, video_messages(question, style=style), 1)
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER)
    split = ids.index(video_id)
    return ids[:split], ids[split + 1 :]


def _ask_streaming(
    model,
    tokenizer,
    chunks: Iterable[torch.Tensor],
    question,
    style,
    max_new_tokens,
    min_pixels,
    max_pixels,
):
    config = model.config
    statistics = dict(zip(("mean", "std"), pixel_statistics(config), strict=True))
    device = model.device
    before, after = _prompt_pieces(tokenizer, question, style)
    cache = model.make_cache()
    seconds = {"vision_and_prefill": 0.0}
    counts = {"frames": 0, "video_tokens": 0, "prompt_tokens": len(before) + len(after)}

    def step(**inputs):
        with torch.no_grad():
            return model(**inputs, **cache_keyword(cache), use_cache=True).logits[:, -1]

    def tokens(ids):
        return torch.tensor([ids], device=device)

    started = time.perf_counter()
    step(input_ids=tokens(before))
    for chunk in _as_chunks(chunks):
        pixels, grid = video_to_patches(
            chunk, config.vision_config, min_pixels=min_pixels, max_pixels=max_pixels, **statistics
        )
        count = video_token_count(grid, config.vision_config.spatial_merge_size)
        input_ids = tokens([config.video_token_id] * count)
        step(
            input_ids=input_ids,
            pixel_values_videos=pixels.to(device, model.dtype),
            video_grid_thw=grid.to(device),
            mm_token_type_ids=torch.full_like(input_ids, 2),
        )
        counts["frames"] += chunk.shape[0]
        counts["video_tokens"] += count
    logits = step(input_ids=tokens(after))
    prefilled = time.perf_counter()
    seconds["vision_and_prefill"] = prefilled - started

    new_tokens = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax(-1))
        if token == tokenizer.eos_token_id:
            break
        new_tokens.append(token)
        logits = step(input_ids=tokens([token]))
    seconds["decode"] = time.perf_counter() - prefilled
    counts["new_tokens"] = len(new_tokens)
    counts["prompt_tokens"] += counts["video_tokens"]
    return Answer(
        text=tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
        new_tokens=new_tokens,
        seconds=seconds,
        counts=counts,
        streamed=True,
    )


def _as_chunks(chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        if not isinstance(chunk, torch.Tensor) or chunk.ndim != 4 or chunk.shape[1] != 3:
            raise ValueError(f"each frame chunk must be a (T, 3, H, W) tensor, got {chunk!r:.80}")
        if chunk.shape[0]:
            yield chunk


def frame_chunks(frames: Iterable, chunk_frames: int) -> Iterator[torch.Tensor]:
    """Group a stream of (3, H, W) frames (or objects with .pixels) into (t, 3, H, W) chunks
    of `chunk_frames` (the last may be shorter)."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    chunk = []
    for frame in frames:
        chunk.append(getattr(frame, "pixels", frame))
        if len(chunk) == chunk_frames:
            yield torch.stack(chunk)
            chunk = []
    if chunk:
        yield torch.stack(chunk)


def default_style(model) -> str:
    """ "sandwich" for all-RWKV students (paper 001 §3.2.3), "standard" otherwise."""
    if can_stream(model) and model.plan.mixer == "rwkv6":
        return "sandwich"
    return "standard"


def ask_video_file(
    model_dir: str,
    video: str,
    question: str,
    *,
    fps: float | None = 1.0,
    num_frames: int | None = None,
    max_frames: int | None = None,
    max_pixels: int = MAX_PIXELS,
    min_pixels: int = MIN_PIXELS,
    max_new_tokens: int = 32,
    style: str = "auto",
    stream: bool | None = None,
    chunk_frames: int = 32,
    tokens_per_frame: int | None = None,
    progress: bool = False,
) -> tuple[Answer, dict]:
    """Load a local model directory and its tokenizer, sample `video`, answer `question`.

    Streaming students read the video frame by frame in chunks of `chunk_frames` (rounded up
    to the temporal patch); other models load the sampled frames at once. Returns the Answer
    and a description of the run (model class, frames, streaming)."""
    from transformers import AutoTokenizer

    from linvid.models.convert import load
    from linvid.video.io import iter_video_frames, load_video

    started = time.perf_counter()
    model = load(model_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    loaded = time.perf_counter()
    style = default_style(model) if style == "auto" else style
    if stream is None:
        stream = can_stream(model) and tokens_per_frame is None
    sampling = {"fps": fps, "num_frames": num_frames, "max_frames": max_frames}
    if stream:
        temporal = model.config.vision_config.temporal_patch_size
        chunk_frames = -(-chunk_frames // temporal) * temporal
        frames = frame_chunks(
            iter_video_frames(video, **sampling, max_pixels=max_pixels), chunk_frames
        )
        if progress:
            from tqdm import tqdm

            frames = tqdm(frames, desc="prefill", unit="chunk", file=sys.stderr)
    else:
        frames, _ = load_video(video, **sampling, max_pixels=max_pixels)
    answer = ask(
        model,
        tokenizer,
        frames,
        question,
        style=style,
        max_new_tokens=max_new_tokens,
        stream=stream,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        tokens_per_frame=tokens_per_frame,
    )
    answer.seconds["load_model"] = loaded - started
    answer.seconds["total"] = time.perf_counter() - started
    run = {"model": type(model).__name__, "style": style, "streamed": answer.streamed}
    return answer, run
