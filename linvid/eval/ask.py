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

import math
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from linvid.eval.prompts import VIDEO_PLACEHOLDER, render_video_prompt, video_messages
from linvid.models.cache import cache_keyword
from linvid.models.processor import load_processor
from linvid.models.qwen2_5_vl import LinvidQwen2_5_VLForConditionalGeneration
from linvid.models.qwen_video import (
    FRAME_LIST_FPS,
    MAX_PIXELS,
    MIN_PIXELS,
    frame_list_metadata,
    pixel_statistics,
    video_inputs,
    video_token_count,
)
from linvid.video.qwen_sampling import FPS_MAX_FRAMES, FRAME_FACTOR

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
    sample_fps: float = FRAME_LIST_FPS,
    processor=None,
) -> Answer:
    """Greedy answer of `model` to `question` about a video.

    frames: (T, 3, H, W) uint8, or an iterable of such chunks (each a whole number of temporal
    patches, e.g. 2 frames for Qwen2.5-VL, except the last) for streaming. style: "standard"
    or "sandwich" (paper 001 §3.2.3). stream: None picks streaming when the model can
    (`can_stream`); True requires it. tokens_per_frame: merge each frame's vision tokens
    down to this many after the vision tower (ToMe, paper 002 §3.1; whole-video mode only).
    sample_fps: frames per second of `frames` (qwen-vl-utils' `sample_fps`; the video tokens'
    temporal positions follow second_per_grid_ts = temporal_patch_size / sample_fps, as with
    Qwen's processor). processor: a checkpoint's Qwen2.5-VL processor: its chat template and
    video processor make the inputs (else linvid's `video_inputs`, the same computation).
    Decoding is greedy on every path (`greedy_generation`).
    """
    stream = can_stream(model) if stream is None else stream
    if stream and not can_stream(model):
        raise ValueError(
            "streaming prefill needs a linvid student whose every layer is a causal linear "
            f"mixer ({', '.join(STREAMING_MIXERS)}); this model has attention or M-MATE layers"
        )
    if stream and tokens_per_frame is not None:
        raise ValueError("tokens_per_frame (per-frame ToMe) needs the whole video: stream=False")
    if not sample_fps > 0:
        raise ValueError(f"sample_fps must be > 0 (frames per second), got {sample_fps!r}")
    encoder = VideoPromptEncoder(
        model, tokenizer, processor, min_pixels=min_pixels, max_pixels=max_pixels
    )
    if stream:
        chunks = [frames] if isinstance(frames, torch.Tensor) else frames
        return _ask_streaming(model, encoder, chunks, question, style, max_new_tokens, sample_fps)
    if not isinstance(frames, torch.Tensor):
        frames = torch.cat(list(frames))
    return _ask_whole(
        model, encoder, frames, question, style, max_new_tokens, tokens_per_frame, sample_fps
    )


class VideoPromptEncoder:
    """Model inputs for a question about one video: with a checkpoint's processor (its chat
    template, tokenizer and video processor, called as a Qwen2.5-VL user calls them), else
    with the tokenizer and linvid's `video_inputs` (the same pixels, grid and
    second_per_grid_ts; tests/eval check the two against each other)."""

    def __init__(self, model, tokenizer, processor=None, *, min_pixels, max_pixels):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer if processor is not None else tokenizer
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    def prompt_ids(self, question: str, style: str, video_tokens: int) -> list[int]:
        """The chat prompt's ids with the video placeholder expanded to `video_tokens`."""
        return render_video_prompt(
            self.tokenizer, video_messages(question, style=style), video_tokens
        )

    def video(self, frames: torch.Tensor, sample_fps: float) -> dict:
        """`video_inputs` of (T, 3, H, W) frames shown at `sample_fps` frames per second."""
        return video_inputs(
            frames,
            self.model.config.vision_config,
            sample_fps=sample_fps,
            statistics=pixel_statistics(self.model.config),
            processor=self.processor,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )

    def whole(self, frames: torch.Tensor, question: str, style: str, sample_fps: float) -> dict:
        """generate() inputs (batch of 1) for the whole video."""
        if self.processor is not None:
            text = self.processor.apply_chat_template(
                video_messages(question, style=style), add_generation_prompt=True, tokenize=False
            )
            inputs = dict(
                self.processor(
                    text=[text],
                    videos=[frames],
                    video_metadata=[frame_list_metadata(frames.shape[0], sample_fps)],
                    do_sample_frames=False,
                    videos_kwargs={
                        "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
                    },
                    return_tensors="pt",
                )
            )
        else:
            inputs = self.video(frames, sample_fps)
            count = video_token_count(
                inputs["video_grid_thw"], self.model.config.vision_config.spatial_merge_size
            )
            input_ids = torch.tensor([self.prompt_ids(question, style, count)])
            inputs.update(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == self.model.config.video_token_id).int() * 2,
            )
        return {
            key: value.to(self.model.device, self.model.dtype)
            if key == "pixel_values_videos"
            else value.to(self.model.device)
            for key, value in inputs.items()
        }


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the checkpoint's generation_config eos ids (Qwen2.5-VL
    lists <|im_end|> and <|endoftext|>) and the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    ids = list(configured) if isinstance(configured, list | tuple) else [configured]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(token) for token in ids))


@contextmanager
def greedy_generation(model, tokenizer):
    """Within: `model.generate()` is plain greedy decoding, the argmax at every step, whatever
    the checkpoint's generation_config says (Qwen2.5-VL's asks for sampling with
    repetition_penalty 1.05): generate() fills every option the caller leaves unset from
    model.generation_config, so that config is swapped for one holding only the special
    token ids. The streamed path's own loop is the same argmax."""
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=getattr(saved, "bos_token_id", None),
    )
    try:
        yield model.generation_config
    finally:
        model.generation_config = saved


def _ask_whole(model, encoder, frames, question, style, max_new_tokens, tokens_per_frame, fps):
    started = time.perf_counter()
    config = model.config
    tokenizer = encoder.tokenizer
    if tokens_per_frame is None:
        inputs = encoder.whole(frames, question, style, fps)
        input_ids = inputs["input_ids"]
        video_tokens = int((input_ids == config.video_token_id).sum())
    else:
        from linvid.models.frame_tome import compressed_video_inputs

        video = encoder.video(frames, fps)
        with torch.no_grad():
            inputs, merged = compressed_video_inputs(
                model,
                tokenizer,
                video["pixel_values_videos"].to(model.device, model.dtype),
                video["video_grid_thw"].to(model.device),
                question,
                tokens_per_frame=tokens_per_frame,
                style=style,
                second_per_grid=float(video["second_per_grid_ts"][0]),
            )
        input_ids = inputs["input_ids"]
        video_tokens = merged.num_tokens
    prepared = time.perf_counter()
    with torch.no_grad(), greedy_generation(model, tokenizer):
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    finished = time.perf_counter()
    new_tokens = output[0, input_ids.shape[1] :].tolist()
    stops = set(stop_token_ids(model, tokenizer))
    while new_tokens and new_tokens[-1] in stops:
        new_tokens.pop()
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


def _prompt_pieces(encoder, question, style) -> tuple[list[int], list[int]]:
    """Token ids before and after the video placeholder of the chat prompt."""
    ids = encoder.prompt_ids(question, style, 1)
    video_id = encoder.tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER)
    split = ids.index(video_id)
    return ids[:split], ids[split + 1 :]


def streaming_inputs(
    model, encoder, chunks: Iterable[torch.Tensor], question: str, style: str, sample_fps: float
) -> Iterator[dict]:
    """The forward calls of a streamed prefill, in order: the prompt before the video, one
    call per chunk of frames, the prompt after it. Together they hold exactly the whole
    video's inputs: each chunk's pixel rows are the next rows of the whole video's
    pixel_values_videos (frames are resized and normalised one by one, and patches are laid
    out frame pair by frame pair), its grid is (chunk pairs, h, w), and position_ids are the
    whole prompt's M-RoPE positions (the model's own get_rope_index on the prompt so far, so
    a chunk's positions are those the whole video gets). Each dict holds input_ids (1, L),
    position_ids (3, 1, L), and for chunks pixel_values_videos, video_grid_thw (1, 3),
    second_per_grid_ts (1,) and mm_token_type_ids (1, L)."""
    config = model.config
    merge = config.vision_config.spatial_merge_size
    before, after = _prompt_pieces(encoder, question, style)
    grid = None  # (t so far, h, w) of the video
    seconds = None
    sent = 0

    def positions(ids: list[int]) -> torch.Tensor:
        """(3, 1, len(ids)) M-RoPE positions of the whole prompt `ids` (the video so far)."""
        input_ids = torch.tensor([ids])
        types = (input_ids == config.video_token_id).int() * 2
        if grid is None:
            return torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
        position_ids, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=types,
            video_grid_thw=torch.tensor([grid]),
            second_per_grid_ts=seconds,
        )
        return position_ids

    def call(ids: list[int], **extra) -> dict:
        nonlocal sent
        position_ids = positions(prompt)[..., sent : len(prompt)]
        sent = len(prompt)
        return {"input_ids": torch.tensor([ids]), "position_ids": position_ids, **extra}

    prompt = list(before)
    yield call(before)
    for chunk in _as_chunks(chunks):
        video = encoder.video(chunk, sample_fps)
        t, h, w = video["video_grid_thw"].reshape(-1).tolist()
        if grid is not None and (h, w) != tuple(grid[1:]):
            raise ValueError(
                f"every chunk must have the same frame size; got grid {h}x{w} after {grid[1]}x"
                f"{grid[2]} (frames of one video are resized to one size)"
            )
        grid = [t + (grid[0] if grid else 0), h, w]
        seconds = video["second_per_grid_ts"]
        count = video_token_count(video["video_grid_thw"], merge)
        ids = [config.video_token_id] * count
        prompt.extend(ids)
        yield call(ids, mm_token_type_ids=torch.full((1, count), 2), **video)
    prompt.extend(after)
    yield call(after)


def _ask_streaming(model, encoder, chunks, question, style, max_new_tokens, sample_fps):
    device = model.device
    tokenizer = encoder.tokenizer
    cache = model.make_cache()
    counts = {"frames": 0, "video_tokens": 0, "prompt_tokens": 0}

    def step(inputs: dict) -> torch.Tensor:
        inputs = {
            key: value.to(device, model.dtype) if key == "pixel_values_videos" else value.to(device)
            for key, value in inputs.items()
        }
        with torch.no_grad():
            return model(**inputs, **cache_keyword(cache), use_cache=True).logits[:, -1]

    def counted(chunks):
        for chunk in chunks:
            counts["frames"] += chunk.shape[0]
            yield chunk

    started = time.perf_counter()
    calls = streaming_inputs(model, encoder, counted(chunks), question, style, sample_fps)
    for inputs in calls:
        logits = step(inputs)
        counts["prompt_tokens"] += inputs["input_ids"].shape[1]
        if "video_grid_thw" in inputs:
            counts["video_tokens"] += inputs["input_ids"].shape[1]
        last_position = int(inputs["position_ids"].max())
    prefilled = time.perf_counter()

    # Decoded tokens continue after the largest position so far, as generate() places them.
    stops = set(stop_token_ids(model, tokenizer))
    new_tokens = []
    for index in range(max_new_tokens):
        token = int(logits.argmax(-1))
        if token in stops:
            break
        new_tokens.append(token)
        position = torch.full((3, 1, 1), last_position + 1 + index)
        logits = step({"input_ids": torch.tensor([[token]]), "position_ids": position})
    counts["new_tokens"] = len(new_tokens)
    return Answer(
        text=tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
        new_tokens=new_tokens,
        seconds={
            "vision_and_prefill": prefilled - started,
            "decode": time.perf_counter() - prefilled,
        },
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


def check_ask_options(
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    max_frames: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    chunk_frames: int | None = None,
    tokens_per_frame: int | None = None,
) -> None:
    """Refuse `linvid ask` option values no run can use, before anything is loaded, decoded
    or allocated: counts that are not integers >= 1 (min_pixels >= 0), an fps that is not a
    finite number > 0, and min_pixels above max_pixels. Raises ValueError naming the
    command's options (--num-frames, --min-pixels, ...) and what they expect."""
    for option, value, lowest in (
        ("--num-frames", num_frames, 1),
        ("--max-frames", max_frames, 1),
        ("--min-pixels", min_pixels, 0),
        ("--max-pixels", max_pixels, 1),
        ("--chunk-frames", chunk_frames, 1),
        ("--tokens-per-frame", tokens_per_frame, 1),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{option} must be an integer >= {lowest}, got {value!r}")
    if fps is not None and not (
        isinstance(fps, int | float)
        and not isinstance(fps, bool)
        and math.isfinite(fps)
        and fps > 0
    ):
        raise ValueError(f"--fps must be a finite number of frames per second > 0, got {fps!r}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(
            f"--min-pixels {min_pixels} is above --max-pixels {max_pixels}: every frame is "
            "resized to between --min-pixels and --max-pixels pixels, so --min-pixels must be "
            "at most --max-pixels"
        )


def fit_frame_count(
    num_frames: int | None, max_frames: int, info: dict, sampling: str, warn
) -> int | None:
    """The frame count to sample for `--num-frames num_frames`: at most `max_frames`, and for
    sampling "qwen" at most the video's frames (Qwen sampling reads each frame once; rounded
    down to an even count). `warn(message)` is told, in one line, when the count is capped or
    when "timestamps" sampling will repeat frames of a video shorter than asked. info:
    `probe_video`'s result."""
    if num_frames is None:
        return None
    notes = []
    if num_frames > max_frames:
        notes.append(f"--num-frames {num_frames} is capped at --max-frames {max_frames}")
        num_frames = max_frames
    available = info["total_frames"]
    if num_frames > available:
        video = f"video {info['path']} has {available} frames, fewer than {num_frames}"
        if sampling == "qwen" and available >= FRAME_FACTOR:
            num_frames = available - available % FRAME_FACTOR
            notes.append(f"{video}: sampling {num_frames} (Qwen sampling takes each frame once)")
        elif sampling != "qwen":
            times = num_frames / available
            notes.append(f"{video}: frames repeat (each about {times:.1f} times)")
    if notes:
        warn("; ".join(notes))
    return num_frames


def _print_warning(message: str) -> None:
    print(f"linvid ask: warning: {message}", file=sys.stderr)


def ask_video_file(
    model_dir: str,
    video: str,
    question: str,
    *,
    fps: float | None = 1.0,
    num_frames: int | None = None,
    max_frames: int | None = FPS_MAX_FRAMES,
    max_pixels: int = MAX_PIXELS,
    min_pixels: int = MIN_PIXELS,
    max_new_tokens: int = 32,
    style: str = "auto",
    stream: bool | None = None,
    chunk_frames: int = 32,
    tokens_per_frame: int | None = None,
    sampling: str = "qwen",
    progress: bool = False,
    warn=_print_warning,
) -> tuple[Answer, dict]:
    """Load a local model directory (and its processor or tokenizer), sample `video`, answer
    `question`. The work of `linvid ask`: errors name its options.

    Frames are sampled and sized as qwen-vl-utils does (sampling "qwen": the frames, grid and
    second_per_grid_ts Qwen2.5-VL's own pipeline gives), or with linvid's "timestamps" plan.
    Streaming students read the video frame by frame in chunks of `chunk_frames` (rounded up
    to the temporal patch); other models load the sampled frames at once. Returns the Answer
    and a description of the run (model class, frames, streaming, processor).

    Everything that can be checked is checked before the model is loaded or a frame decoded:
    the options (`check_ask_options`), the model directory (`check_model_directory`: a local
    Qwen2.5-VL-style model with safetensors weights and tokenizer files), the video and its
    sampling plan. max_frames (None: FPS_MAX_FRAMES, 768, Qwen's cap) caps fps sampling and
    num_frames alike (`fit_frame_count`); `warn(message)` (default: one line on stderr) is
    told when a count is capped or frames would repeat."""
    settings = VideoSettings(
        fps=fps,
        num_frames=num_frames,
        max_frames=FPS_MAX_FRAMES if max_frames is None else max_frames,
        max_pixels=max_pixels,
        min_pixels=min_pixels,
        sampling=sampling,
        chunk_frames=chunk_frames,
        tokens_per_frame=tokens_per_frame,
    )
    settings.check()
    check_model_directory_for_ask(model_dir)
    # The video is checked (and a capped frame count told) before the model is loaded.
    options = settings.sampling_options(video, warn)
    started = time.perf_counter()
    asker = VideoAsker.load(model_dir, settings, style=style, stream=stream, warn=warn)
    loaded = time.perf_counter()
    answer, run = asker.answer(
        video, question, max_new_tokens=max_new_tokens, progress=progress, options=options
    )
    answer.seconds["load_model"] = loaded - started
    answer.seconds["total"] = time.perf_counter() - started
    return answer, run


def check_model_directory_for_ask(model_dir: str, option: str = "--model") -> None:
    """A local Qwen2.5-VL-style model directory with safetensors weights and tokenizer files
    (`check_model_directory`)."""
    from linvid.models.directory import check_model_directory

    check_model_directory(model_dir, option, tokenizer=True)


@dataclass(frozen=True)
class VideoSettings:
    """How `linvid ask` (and the lmms-eval plugin) read a video file: the sampling and sizing
    options of `load_video`, the streamed chunk and per-frame ToMe."""

    fps: float | None = 1.0
    num_frames: int | None = None
    max_frames: int = FPS_MAX_FRAMES
    max_pixels: int = MAX_PIXELS
    min_pixels: int = MIN_PIXELS
    sampling: str = "qwen"
    chunk_frames: int = 32
    tokens_per_frame: int | None = None

    def check(self) -> None:
        check_ask_options(
            fps=self.fps,
            num_frames=self.num_frames,
            max_frames=self.max_frames,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            chunk_frames=self.chunk_frames,
            tokens_per_frame=self.tokens_per_frame,
        )

    def sampling_options(self, video: str, warn=_print_warning) -> dict:
        """`load_video` / `iter_video_frames` keywords for `video` (its frame count fitted by
        `fit_frame_count`)."""
        from linvid.video.io import probe_video

        info = probe_video(video)
        num_frames = fit_frame_count(self.num_frames, self.max_frames, info, self.sampling, warn)
        return {
            "fps": self.fps,
            "num_frames": num_frames,
            "max_frames": self.max_frames,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "sampling": self.sampling,
        }


class VideoAsker:
    """A loaded model with `linvid ask`'s settings, answering questions about video files: the
    one path `linvid ask` and the lmms-eval plugin share."""

    def __init__(
        self,
        model,
        tokenizer,
        processor,
        settings: VideoSettings,
        *,
        style: str = "auto",
        stream: bool | None = None,
        warn=_print_warning,
    ):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.settings = settings
        self.style = default_style(model) if style == "auto" else style
        if stream and not can_stream(model):
            raise ValueError(
                "streaming prefill needs a linvid student whose every layer is a causal linear "
                f"mixer ({', '.join(STREAMING_MIXERS)}); this model has attention or M-MATE "
                "layers"
            )
        if stream is None:
            stream = can_stream(model) and settings.tokens_per_frame is None
        self.stream = stream
        self.warn = warn

    @classmethod
    def load(
        cls, model_dir: str, settings: VideoSettings, *, dtype=None, device=None, **options
    ) -> VideoAsker:
        """Load `model_dir` (safetensors only, offline) with its processor or tokenizer."""
        from transformers import AutoTokenizer

        from linvid.models.convert import load

        kwargs = {"local_files_only": True, "use_safetensors": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = load(model_dir, **kwargs).eval()
        if device is not None:
            model = model.to(device)
        processor = load_processor(model_dir)
        tokenizer = (
            processor.tokenizer
            if processor is not None
            else AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        )
        return cls(model, tokenizer, processor, settings, **options)

    def frames(self, video: str, *, progress: bool = False, options: dict | None = None):
        """The sampled frames of `video`, (T, 3, H, W) uint8 (an iterator of chunks when
        streaming), and its sampling plan. options: `VideoSettings.sampling_options` of the
        video, when already computed."""
        from linvid.video.io import iter_video_frames, load_video, probe_video, sampling_plan

        if options is None:
            options = self.settings.sampling_options(video, self.warn)
        plan = sampling_plan(probe_video(video), **options)
        if not self.stream:
            frames, _ = load_video(video, **options)
            return frames, plan
        temporal = self.model.config.vision_config.temporal_patch_size
        chunk_frames = -(-self.settings.chunk_frames // temporal) * temporal
        frames = frame_chunks(iter_video_frames(video, **options), chunk_frames)
        if progress:
            from tqdm import tqdm

            total = -(-len(plan.times) // chunk_frames)
            frames = tqdm(frames, desc="prefill", unit="chunk", total=total, file=sys.stderr)
        return frames, plan

    def answer(
        self,
        video: str,
        question: str,
        *,
        max_new_tokens: int = 32,
        progress: bool = False,
        options: dict | None = None,
    ) -> tuple[Answer, dict]:
        """Greedy answer to `question` about the video file, and a description of the run.
        options: `VideoSettings.sampling_options` of the video, when already computed."""
        started = time.perf_counter()
        frames, plan = self.frames(video, progress=progress, options=options)
        try:
            answer = ask(
                self.model,
                self.tokenizer,
                frames,
                question,
                style=self.style,
                max_new_tokens=max_new_tokens,
                stream=self.stream,
                min_pixels=self.settings.min_pixels,
                max_pixels=self.settings.max_pixels,
                tokens_per_frame=self.settings.tokens_per_frame,
                sample_fps=plan.sample_fps,
                processor=self.processor,
            )
        finally:
            if hasattr(frames, "close"):  # the progress bar ends here, also on Ctrl-C or an error
                frames.close()
        answer.seconds["total"] = time.perf_counter() - started
        run = {
            "model": type(self.model).__name__,
            "style": self.style,
            "streamed": answer.streamed,
            "processor": type(self.processor).__name__ if self.processor is not None else None,
            "sampling": self.settings.sampling,
            "sample_fps": plan.sample_fps,
        }
        return answer, run
