"""Video and image conversation data for distillation: JSONL in LLaVA-Video-178K's and
LLaVA(-OneVision)'s format, token ids with answer-only labels, batches for Qwen2.5-VL-style
models, and a disk cache of the frozen vision tower's video outputs.

One line of the JSONL file holds a video, one image or several images:
    {"video": "clips/a.mp4", "conversations": [{"from": "human", "value": "<video>\\nWhat..."},
     {"from": "gpt", "value": "A dog."}, {"from": "human", "value": "..."}, ...]}
    {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nDescribe."}, ...]}
    {"image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human",
     "value": "<image> and <image>: what differs?"}, ...]}
A video line has "<video>" once; an image line has one "<image>" per image, in the images'
order, across its human turns. Paths are relative to the JSONL file's folder (or to an
explicit `video_root`). One file (and one batch) may mix video and image lines. Images are
built as Qwen2.5-VL's processor builds them (pixel_values, image_grid_thw, one
<|image_pad|> per merged patch, mm_token_type_ids 1); the vision feature cache holds videos
only (images always go through the vision tower).

Bad samples. A sample can turn out bad only when it is read (missing or unreadable video or
image,
too long for max_sequence_length), and a DataLoader needs `__getitem__` to return something.
So `__getitem__` returns a `SkippedSample(index, reason)` marker for a bad sample (or raises
with `fail_on_bad_samples=True`), and `collate` drops the markers and lists them in the
batch's "skipped" entry. The dataset remembers bad samples by index in `dataset.skipped`:
directly when it is read in this process (num_workers=0), and through
`dataset.record_skipped(batch)` for batches made in DataLoader workers (each worker holds its
own copy of the dataset); both are keyed by index, so a sample is counted once however often
it is read. A batch whose samples were all bad has no "input_ids": the loop skips it.
Missing video and image files need no decoding to be found: `missing_videos` lists them for a whole
data set up front (the trainer stops on them, or reports them once and marks them skipped
with `skip_known`).

Padding is on the right (the usual layout for training: positions start at 0 in every row);
the attention mask marks the padding, which Qwen2.5-VL's 3-D positions respect.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.modeling_outputs import BaseModelOutputWithPooling

from linvid.eval.prompts import DEFAULT_CHAT_TEMPLATE, PROMPT_STYLES, VIDEO_PLACEHOLDER
from linvid.models.frame_tome import FrameBudget
from linvid.models.qwen_video import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_PIXELS,
    MIN_PIXELS,
    video_inputs,
    video_to_patches,
    video_token_count,
)
from linvid.video.io import VideoError, load_video, probe_video, sampling_plan
from linvid.video.qwen_sampling import processor_smart_resize, second_per_grid

VIDEO_MARKER = "<video>"
IMAGE_MARKER = "<image>"
IMAGE_PLACEHOLDER = "<|image_pad|>"
# transformers' Qwen2VLImageProcessor size defaults (its "shortest_edge" / "longest_edge" are
# pixel areas): the image bounds when the teacher ships no processor.
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
# mm_token_type_ids values (transformers' ProcessorMixin.create_mm_token_type_ids).
IMAGE_TYPE, VIDEO_TYPE = 1, 2
ROLES = ("human", "gpt")
IGNORE_INDEX = -100  # labels the loss skips (transformers' cross-entropy ignore_index)
END_OF_TURN = "<|im_end|>"
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
VIDEO_INPUT_KEYS = ("video_grid_thw", "second_per_grid_ts")  # in a batch holding a video
IMAGE_INPUT_KEYS = ("image_grid_thw",)  # in a batch holding an image


@dataclass(frozen=True)
class Sample:
    """One conversation about one video or about images: the video's path (resolved; None for
    an image conversation), the (question, answer) turns in order (exactly one question holds
    the "<video>" marker; or the questions hold one "<image>" per image, in order), where it
    came from ("file:line"), and the images' paths (resolved; () for a video conversation)."""

    video: str | None
    turns: tuple[tuple[str, str], ...]
    source: str
    images: tuple[str, ...] = ()


class SkippedSample(NamedTuple):
    """What `VideoConversationDataset.__getitem__` returns for a bad sample."""

    index: int
    reason: str


def read_conversations(path: str | os.PathLike, *, video_root: str | None = None) -> list[Sample]:
    """Parse a LLaVA-Video-178K-style JSONL file into Samples.

    Each non-blank line must be a JSON object with "video" (a path, relative to `video_root`,
    default the JSONL file's folder) and "conversations": turns alternating "human" and "gpt",
    starting with "human" and ending with "gpt", with "<video>" exactly once in a human turn.
    Raises ValueError naming file:line and what was wrong. Video files are not opened here.
    """
    path = os.fspath(path)
    root = video_root if video_root is not None else os.path.dirname(os.path.abspath(path))
    samples = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                samples.append(_parse_line(line, f"{path}:{number}", root))
    if not samples:
        raise ValueError(f"{path} holds no conversations (it is empty)")
    return samples


def _parse_line(line: str, source: str, root: str) -> Sample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{source}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
    video, images = record.get("video"), record.get("image")
    if (video is None) == (images is None):
        raise ValueError(
            f"{source}: expected exactly one of 'video' (a path) or 'image' (a path or a list "
            f"of paths), got {'both' if video is not None else 'neither'}"
        )
    if video is not None and (not isinstance(video, str) or not video):
        raise ValueError(f"{source}: expected a non-empty string under 'video', got {video!r}")
    if images is not None:
        images = [images] if isinstance(images, str) else images
        if (
            not isinstance(images, list)
            or not images
            or not all(isinstance(image, str) and image for image in images)
        ):
            raise ValueError(
                f"{source}: expected a non-empty path or a non-empty list of non-empty paths "
                f"under 'image', got {record['image']!r:.80}"
            )
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{source}: expected a non-empty list under 'conversations'")
    values = []
    for position, turn in enumerate(turns):
        expected = ROLES[position % 2]
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(
                f"{source}: conversations[{position}] must be an object with 'from' and "
                f"'value', got {turn!r:.80}"
            )
        if turn["from"] != expected:
            raise ValueError(
                f"{source}: roles must alternate human, gpt, ...; conversations[{position}] "
                f"is from {turn['from']!r}, expected {expected!r}"
            )
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            raise ValueError(f"{source}: conversations[{position}] has an empty 'value'")
        values.append(turn["value"])
    if len(values) % 2:
        raise ValueError(f"{source}: the conversation ends with a human turn, not a gpt answer")
    questions, answers = values[0::2], values[1::2]
    for marker in (VIDEO_MARKER, IMAGE_MARKER):
        if any(marker in answer for answer in answers):
            raise ValueError(
                f"{source}: '{marker}' appears in a gpt answer; expected it in human turns only"
            )
    videos = sum(question.count(VIDEO_MARKER) for question in questions)
    pictures = sum(question.count(IMAGE_MARKER) for question in questions)
    if video is not None and (videos != 1 or pictures):
        raise ValueError(
            f"{source}: expected '{VIDEO_MARKER}' exactly once, in a human turn, and no "
            f"'{IMAGE_MARKER}'; found '{VIDEO_MARKER}' {videos} time(s) and '{IMAGE_MARKER}' "
            f"{pictures} time(s) in human turns"
        )
    if images is not None and (pictures != len(images) or videos):
        raise ValueError(
            f"{source}: expected '{IMAGE_MARKER}' once per image ({len(images)}) in the human "
            f"turns and no '{VIDEO_MARKER}'; found '{IMAGE_MARKER}' {pictures} time(s) and "
            f"'{VIDEO_MARKER}' {videos} time(s)"
        )

    def resolve(path: str) -> str:
        return os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))

    turn_pairs = tuple(zip(questions, answers, strict=True))
    if video is not None:
        return Sample(resolve(video), turn_pairs, source)
    return Sample(None, turn_pairs, source, tuple(resolve(image) for image in images))


def missing_videos(samples: Sequence[Sample]) -> dict[int, str]:
    """The samples whose video or image files cannot be read, found with cheap checks only
    (the path exists, is a regular file and is not empty; nothing is opened or decoded, so a
    whole data set is checked in about one `stat` per distinct file): sample index -> reason,
    naming the file and the sample's data line ("file:line", `Sample.source`). What these
    checks pass can still turn out undecodable when the sample is read (see "Bad samples"
    above)."""
    problems: dict[str, str | None] = {}
    missing = {}
    for index, sample in enumerate(samples):
        kind = "video" if sample.video is not None else "image"
        for path in (sample.video,) if sample.video is not None else sample.images:
            if path not in problems:
                problems[path] = _video_file_problem(path)
            if problems[path] is not None:
                missing[index] = f"{sample.source}: {kind} {path} {problems[path]}"
                break
    return missing


def _video_file_problem(path: str) -> str | None:
    """Why `path` cannot be a video (or image) file ("does not exist", "is not a file", "is
    empty"), or None."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if not stat.S_ISREG(status.st_mode):
        return "is not a file"
    if status.st_size == 0:
        return "is empty"
    return None


# ---------------------------------------------------------------------------------------------
# Dataset


class VideoConversationDataset(torch.utils.data.Dataset):
    """Token ids, answer-only labels and video or image patches for each Sample.

    `dataset[i]` is a dict: input_ids (L,), labels (L,) = IGNORE_INDEX except on the
    assistant answers and the end-of-turn token closing each, mm_token_type_ids (L,) = 2 on
    video tokens, 1 on image tokens, else 0, sample_index, and for a video sample
    pixel_values_videos (P, C) float32 (None when `feature_cache` already holds this video's
    features, which then skips decoding), video_grid_thw (1, 3), second_per_grid_ts (1,)
    (seconds per temporal patch of the sampled video, as Qwen's processor gives it),
    video_key (the cache key); for an image sample pixel_values (P, C) float32 (the rows of
    its images in order) and image_grid_thw (n_images, 3) = [1, h, w] each, as
    `Qwen2_5_VLProcessor` returns them (`image_inputs`). Or a SkippedSample (see the module
    docstring).

    Sampling: sampling ("qwen", qwen-vl-utils' frames and sizes, or "timestamps"), fps (1.0
    unless num_frames is given) / num_frames / max_frames as in `linvid.video.io.load_video`;
    min_pixels / max_pixels bound each frame's area as in `load_video` and
    `video_to_patches`; image_min_pixels / image_max_pixels bound each image's area (None: the
    processor's image bounds, or transformers' defaults IMAGE_MIN_PIXELS / IMAGE_MAX_PIXELS
    without a processor); pixel_statistics: the model's (mean, std) (`pixel_statistics(config)`,
    default CLIP's); processor: the teacher's Qwen2.5-VL processor when its directory has one
    (`load_processor`): its video processor makes the pixels. style: "standard" (video, then
    the question's text) or "sandwich" (question, video, question; paper 001 §3.2.3) for the
    turn holding the video. Images stay where their "<image>" markers are ("standard") or
    come between two copies of their turn's text ("sandwich").
    Conversations longer than max_sequence_length lose whole trailing turns; one that cannot
    keep its video or every image and the answer after the last of them is a bad sample
    (never cut mid-video). merged_tokens: the stage's per-frame ToMe
    (`linvid.models.frame_tome.FrameBudget`), when it merges: lengths then count each video
    or image with the tokens the model sees after the merge (exactly the length
    `merged_video_batch` gives), while the items keep every placeholder (the merge runs
    after the vision tower).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenizer,
        vision_config,
        *,
        fps: float | None = None,
        num_frames: int | None = None,
        max_frames: int | None = None,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        max_sequence_length: int | None = None,
        style: str = "standard",
        fail_on_bad_samples: bool = False,
        feature_cache: VisionFeatureCache | None = None,
        pixel_statistics: tuple | None = None,
        sampling: str = "qwen",
        processor=None,
        image_min_pixels: int | None = None,
        image_max_pixels: int | None = None,
        merged_tokens: FrameBudget | None = None,
    ):
        self.processor = processor
        self.merged_tokens = merged_tokens
        if style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")
        if max_sequence_length is not None and max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length!r}")
        self.samples = list(samples)
        self.tokenizer = tokenizer
        self.vision_config = vision_config
        if fps is not None and num_frames is not None:
            raise ValueError(f"give fps or num_frames, not both; got {fps!r} and {num_frames!r}")
        if fps is None and num_frames is None:
            fps = 1.0
        self.sampling = {
            "sampling": sampling,
            "fps": fps,
            "num_frames": num_frames,
            "max_frames": max_frames,
        }
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.image_min_pixels, self.image_max_pixels = image_min_pixels, image_max_pixels
        self.max_sequence_length = max_sequence_length
        self.style = style
        self.fail_on_bad_samples = fail_on_bad_samples
        self.feature_cache = feature_cache
        self.pixel_mean, self.pixel_std = pixel_statistics or (CLIP_MEAN, CLIP_STD)
        self.template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        known = end is not None and end != tokenizer.unk_token_id
        self.end_of_turn_id = end if known else tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self._skipped: dict[int, str] = {}
        self._sample_fps: dict[str, float] = {}  # video key -> its sampled frames per second

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def skipped(self) -> list[tuple[int, str]]:
        """The bad samples seen so far, (index, reason), by index."""
        return sorted(self._skipped.items())

    @property
    def num_skipped(self) -> int:
        return len(self._skipped)

    def record_skipped(self, batch: Mapping) -> None:
        """Remember the bad samples a batch from `collate` reports (DataLoader workers)."""
        for index, reason in batch.get("skipped", ()):
            self._skip(index, reason)

    def skip_known(self, reasons: Mapping[int, str]) -> None:
        """Mark samples already found bad (`missing_videos`, reported up front) as skipped,
        without another warning: they are never read. Ignored with `fail_on_bad_samples`."""
        if self.fail_on_bad_samples:
            return
        for index, reason in reasons.items():
            self._skipped.setdefault(index, reason)

    def collate(self, batch: Sequence) -> dict:
        """`collate` with this tokenizer's pad id (a DataLoader's collate_fn)."""
        return collate(batch, self.pad_token_id)

    def _skip(self, index: int, reason: str) -> SkippedSample:
        if index not in self._skipped:
            warnings.warn(f"skipping sample {index}: {reason}", stacklevel=3)
            self._skipped[index] = reason
        return SkippedSample(index, reason)

    def __getitem__(self, index: int) -> dict | SkippedSample:
        if index in self._skipped and not self.fail_on_bad_samples:
            return SkippedSample(index, self._skipped[index])
        sample = self.samples[index]
        try:
            if sample.video is None:
                return self._build_images(index, sample)
            return self._build(index, sample)
        except (VideoError, ImageError, SampleTooLong) as error:
            reason = f"{sample.source}: {error}"
            if self.fail_on_bad_samples:
                raise type(error)(reason) from error
            return self._skip(index, reason)

    def video_key(self, sample: Sample) -> str:
        """Cache key of a sample's video: its path, size and modification time, the sampling
        and the patch layout (what the vision tower's input depends on)."""
        try:
            status = os.stat(sample.video)
        except OSError:
            raise VideoError(f"video file not found: {sample.video}") from None
        config = self.vision_config
        settings = {
            "path": os.path.abspath(sample.video),
            "size": status.st_size,
            "mtime_ns": status.st_mtime_ns,
            **self.sampling,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "patch": [config.patch_size, config.temporal_patch_size, config.spatial_merge_size],
            "pixel_statistics": [list(self.pixel_mean), list(self.pixel_std)],
        }
        text = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _build(self, index: int, sample: Sample) -> dict:
        key = self.video_key(sample)
        pixels = None
        cached = self.feature_cache.grid(key) if self.feature_cache is not None else None
        if cached is not None:
            grid = cached
            if key not in self._sample_fps:  # once per video, not once per epoch
                # The plan alone (container metadata, nothing decoded) gives the sampled rate.
                plan = sampling_plan(probe_video(sample.video), **self._load_options())
                self._sample_fps[key] = plan.sample_fps
            frames_per_second = self._sample_fps[key]
        else:
            frames, meta = load_video(sample.video, **self._load_options())
            frames_per_second = self._sample_fps[key] = meta["sample_fps"]
            video = video_inputs(
                frames,
                self.vision_config,
                sample_fps=frames_per_second,
                statistics=(self.pixel_mean, self.pixel_std),
                processor=self.processor,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
            )
            pixels, grid = video["pixel_values_videos"], video["video_grid_thw"]
        seconds = second_per_grid(frames_per_second, self.vision_config.temporal_patch_size)
        count = video_token_count(grid, self.vision_config.spatial_merge_size)
        seen = {VIDEO_PLACEHOLDER: [self._seen_tokens(grid, count)]}
        input_ids, labels = self._tokenize(sample, {VIDEO_PLACEHOLDER: [count]}, seen)
        ids = torch.tensor(input_ids)
        return {
            "input_ids": ids,
            "labels": torch.tensor(labels),
            "mm_token_type_ids": self._token_types(ids),
            "pixel_values_videos": pixels,
            "video_grid_thw": grid.reshape(1, 3).long(),
            "second_per_grid_ts": torch.tensor([seconds]),
            "video_key": key,
            "sample_index": index,
        }

    def _build_images(self, index: int, sample: Sample) -> dict:
        images = [read_image(path) for path in sample.images]
        inputs = image_inputs(
            images,
            self.vision_config,
            processor=self.processor,
            statistics=(self.pixel_mean, self.pixel_std),
            min_pixels=self.image_min_pixels,
            max_pixels=self.image_max_pixels,
        )
        grids = inputs["image_grid_thw"]
        merge = self.vision_config.spatial_merge_size
        counts = [video_token_count(grid, merge) for grid in grids]
        seen = [self._seen_tokens(grid, n) for grid, n in zip(grids, counts, strict=True)]
        input_ids, labels = self._tokenize(
            sample, {IMAGE_PLACEHOLDER: counts}, {IMAGE_PLACEHOLDER: seen}
        )
        ids = torch.tensor(input_ids)
        return {
            "input_ids": ids,
            "labels": torch.tensor(labels),
            "mm_token_type_ids": self._token_types(ids),
            "pixel_values": inputs["pixel_values"],
            "image_grid_thw": grids.long(),
            "sample_index": index,
        }

    def _seen_tokens(self, grid: torch.Tensor, count: int) -> int:
        """The tokens the stage's model sees of a video or image with patch grid `grid` and
        `count` placeholders: `count` unless the stage merges frames (merged_tokens)."""
        if self.merged_tokens is None:
            return count
        return self.merged_tokens.count(grid, self.vision_config.spatial_merge_size)

    def _token_types(self, ids: torch.Tensor) -> torch.Tensor:
        """mm_token_type_ids (L,): VIDEO_TYPE on video tokens, IMAGE_TYPE on image tokens."""
        types = torch.zeros_like(ids)
        types[ids == self.image_token_id] = IMAGE_TYPE
        types[ids == self.video_token_id] = VIDEO_TYPE
        return types

    def _load_options(self) -> dict:
        """`load_video` arguments: the sampling and the per-frame pixel bounds."""
        return {**self.sampling, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}

    def _messages(self, sample: Sample) -> list[dict]:
        """Chat messages of the whole conversation, each marker replaced by a video or image
        part."""
        messages = []
        for question, answer in sample.turns:
            content = question
            if VIDEO_MARKER in question:
                before, after = (part.strip() for part in question.split(VIDEO_MARKER))
                text = " ".join(part for part in (before, after) if part)
                video = {"type": "video"}
                parts = [{"type": "text", "text": text}] if text else []
                if self.style == "standard":
                    content = [video, *parts]
                else:
                    content = [*parts, video, *[dict(part) for part in parts]]
            elif IMAGE_MARKER in question:
                pieces = [piece.strip() for piece in question.split(IMAGE_MARKER)]
                images = [{"type": "image"} for _ in pieces[1:]]
                if self.style == "standard":  # each image where its marker is
                    content = []
                    for piece, image in zip(pieces, [*images, None], strict=True):
                        if piece:
                            content.append({"type": "text", "text": piece})
                        if image is not None:
                            content.append(image)
                else:
                    text = " ".join(piece for piece in pieces if piece)
                    parts = [{"type": "text", "text": text}] if text else []
                    content = [*parts, *images, *[dict(part) for part in parts]]
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": answer})
        return messages

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _tokenize(
        self,
        sample: Sample,
        visual_tokens: Mapping[str, list[int]],
        seen_tokens: Mapping[str, list[int]] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels of the conversation, built turn by turn.

        The template renders the conversation up to each question (with the generation
        prompt) and up to each answer; each rendering must extend the previous one, so the
        new text is exactly one prompt piece or one answer piece. Pieces are tokenized on their
        own and concatenated, so the labelled tokens are those of the answer pieces, up to and
        including the first end-of-turn token (the template's trailing newline stays
        unlabelled). visual_tokens: placeholder (VIDEO_PLACEHOLDER / IMAGE_PLACEHOLDER) -> the
        token count of each of its videos or images in order; the n-th placeholder the
        template renders is expanded to the n-th count. seen_tokens: likewise, the tokens the
        model sees of each after per-frame ToMe (default visual_tokens): max_sequence_length
        bounds the sequence with these counts.
        """
        messages = self._messages(sample)
        input_ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        last_visual_turn = max(
            i for i, (q, _) in enumerate(sample.turns) if VIDEO_MARKER in q or IMAGE_MARKER in q
        )
        remaining = {placeholder: list(counts) for placeholder, counts in visual_tokens.items()}
        seen_tokens = visual_tokens if seen_tokens is None else seen_tokens
        removed = {}  # placeholder -> tokens the merge removes from its first k items
        for placeholder, counts in visual_tokens.items():
            saved = [n - seen for n, seen in zip(counts, seen_tokens[placeholder], strict=True)]
            removed[placeholder] = [sum(saved[:k]) for k in range(len(saved) + 1)]
        for turn in range(len(sample.turns)):
            prompt = self._render(messages[: 2 * turn + 1], generation_prompt=True)
            full = self._render(messages[: 2 * turn + 2], generation_prompt=False)
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise ValueError(
                    "the chat template does not render conversations incrementally (a "
                    "rendering of the first turns is not a prefix of the longer one); "
                    "answer labels cannot be placed"
                )
            prompt_ids = self._expand(prompt[len(rendered) :], remaining)
            answer_ids = self._encode(full[len(prompt) :])
            if self.end_of_turn_id in answer_ids:
                labelled = answer_ids.index(self.end_of_turn_id) + 1
            else:
                labelled = len(answer_ids)
            answer_labels = answer_ids[:labelled] + [IGNORE_INDEX] * (len(answer_ids) - labelled)
            placed = {p: len(counts) - len(remaining[p]) for p, counts in visual_tokens.items()}
            length = len(input_ids) + len(prompt_ids) + len(answer_ids)
            length -= sum(removed[p][count] for p, count in placed.items())
            if self.max_sequence_length is not None and length > self.max_sequence_length:
                if turn <= last_visual_turn:
                    total = sum(sum(counts) for counts in seen_tokens.values())
                    what = "video" if VIDEO_PLACEHOLDER in visual_tokens else "last image"
                    kind = "video" if what == "video" else "image"
                    merged = " merged" if self.merged_tokens is not None else ""
                    raise SampleTooLong(
                        f"{length} tokens up to the end of the answer after the {what} "
                        f"({total}{merged} {kind} tokens) exceed "
                        f"max_sequence_length={self.max_sequence_length}"
                    )
                break  # later turns are dropped whole
            input_ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_labels
            rendered = full
        left = {placeholder: len(counts) for placeholder, counts in remaining.items() if counts}
        if left:
            raise ValueError(
                f"the chat template rendered too few placeholders: {left} left unplaced; "
                "expected one per video or image (does the template render image parts?)"
            )
        return input_ids, labels

    def _expand(self, text: str, remaining: dict[str, list[int]]) -> list[int]:
        """Token ids of `text` with each video / image placeholder repeated its count of
        tokens, taken in order from `remaining` (consumed)."""
        placeholders = (VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER)
        ids: list[int] = []
        while True:
            found = [(text.find(p), p) for p in placeholders if p in text]
            if not found:
                return ids + self._encode(text)
            position, placeholder = min(found)
            counts = remaining.get(placeholder)
            if not counts:
                given = len(remaining.get(placeholder, ()))
                raise ValueError(
                    f"the chat template rendered more {placeholder} placeholders than the "
                    f"sample has {'videos' if placeholder == VIDEO_PLACEHOLDER else 'images'}; "
                    f"expected one per {'video' if placeholder == VIDEO_PLACEHOLDER else 'image'}"
                    f" ({given} left)"
                )
            token = self.video_token_id if placeholder == VIDEO_PLACEHOLDER else self.image_token_id
            ids += [*self._encode(text[:position]), *([token] * counts.pop(0))]
            text = text[position + len(placeholder) :]


class SampleTooLong(ValueError):
    """A conversation that cannot fit max_sequence_length without cutting its video or an
    image."""


class ImageError(ValueError):
    """An image file that is missing or cannot be decoded."""


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as an RGB PIL image, fully decoded (the file is closed again).
    Raises ImageError naming the file when it is missing or not a readable image."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageError(f"image file cannot be decoded: {path} ({error})") from None


def image_inputs(
    images: Sequence[Image.Image],
    vision_config,
    *,
    processor=None,
    statistics: tuple[tuple[float, ...], tuple[float, ...]] = (CLIP_MEAN, CLIP_STD),
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> dict[str, torch.Tensor]:
    """The image inputs Qwen2.5-VL's processor returns for the images of one conversation.

    images: RGB PIL images. processor: a checkpoint's Qwen2.5-VL processor, whose image
    processor then makes the pixels (its size bounds, replaced by min_pixels / max_pixels
    when given). Without one the same arithmetic in torch: each image resized to HF's
    `smart_resize` size within [min_pixels, max_pixels] (default IMAGE_MIN_PIXELS /
    IMAGE_MAX_PIXELS) by torchvision v2's bicubic antialiased resize of the uint8 image (the
    call HF's Qwen2VLImageProcessor makes; its native uint8 kernel differs from the float
    one videos are resized with, by up to 17 levels on noise), normalised with
    `statistics` (mean, std) as the processor does, repeated over the temporal patch and
    flattened in the processor's patch order (`video_to_patches` of a one-frame video).
    Returns {"pixel_values": (sum of h*w, 3*tp*p*p) float32, "image_grid_thw": (n, 3) long,
    rows [1, h, w] in patches}.
    """
    if processor is not None:
        size = dict(processor.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        processed = processor.image_processor(images=list(images), size=size, return_tensors="pt")
        return {
            "pixel_values": processed["pixel_values"],
            "image_grid_thw": processed["image_grid_thw"],
        }
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    low = IMAGE_MIN_PIXELS if min_pixels is None else min_pixels
    high = IMAGE_MAX_PIXELS if max_pixels is None else max_pixels
    factor = vision_config.patch_size * vision_config.spatial_merge_size
    mean, std = statistics
    rows, grids = [], []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
        frame = pixels.permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
        size = processor_smart_resize(*frame.shape[-2:], factor, low, high)
        if tuple(frame.shape[-2:]) != size:
            frame = resize(
                frame, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        patches, grid = video_to_patches(frame, vision_config, resize=False, mean=mean, std=std)
        rows.append(patches)
        grids.append(grid)
    return {"pixel_values": torch.cat(rows), "image_grid_thw": torch.cat(grids)}


# ---------------------------------------------------------------------------------------------
# Batches


def collate(batch: Sequence, pad_token_id: int) -> dict:
    """Right-padded batch of `VideoConversationDataset` items (video and image samples may
    mix); SkippedSamples are dropped and listed under "skipped" as (index, reason).

    Returns input_ids, attention_mask, labels (padded with IGNORE_INDEX), mm_token_type_ids
    (padded with 0), all (B, L); sample_index (B,); videos_per_sample and images_per_sample
    (B,) long; skipped. When a sample has a video: video_grid_thw (V, 3) and
    second_per_grid_ts (V,) of the V videos in batch order, has_pixels (V,) bool, video_keys
    (V), and pixel_values_videos (sum of P, C): the rows of the videos whose pixels were
    loaded (absent if none were). When a sample has images: image_grid_thw (I, 3) and
    pixel_values (sum of P, C) of the I images in batch order. Qwen2.5-VL reads each
    sample's videos and images in this order, as its processor lays out a batch.
    """
    items = [item for item in batch if not isinstance(item, SkippedSample)]
    skipped = [tuple(item) for item in batch if isinstance(item, SkippedSample)]
    if not items:
        return {"skipped": skipped}
    longest = max(item["input_ids"].shape[0] for item in items)

    def pad(name, value):
        rows = [
            torch.nn.functional.pad(item[name], (0, longest - item[name].shape[0]), value=value)
            for item in items
        ]
        return torch.stack(rows)

    lengths = torch.tensor([item["input_ids"].shape[0] for item in items])
    videos = [item for item in items if "video_grid_thw" in item]
    images = [item for item in items if "image_grid_thw" in item]
    output = {
        "input_ids": pad("input_ids", pad_token_id),
        "attention_mask": (torch.arange(longest)[None, :] < lengths[:, None]).long(),
        "labels": pad("labels", IGNORE_INDEX),
        "mm_token_type_ids": pad("mm_token_type_ids", 0),
        "sample_index": torch.tensor([item["sample_index"] for item in items]),
        "videos_per_sample": torch.tensor([int("video_grid_thw" in item) for item in items]),
        "images_per_sample": torch.tensor(
            [item["image_grid_thw"].shape[0] if "image_grid_thw" in item else 0 for item in items]
        ),
        "skipped": skipped,
    }
    if videos:
        output["video_grid_thw"] = torch.cat([item["video_grid_thw"] for item in videos])
        output["second_per_grid_ts"] = torch.cat([item["second_per_grid_ts"] for item in videos])
        output["has_pixels"] = torch.tensor(
            [item["pixel_values_videos"] is not None for item in videos]
        )
        output["video_keys"] = [item["video_key"] for item in videos]
        pixels = [
            item["pixel_values_videos"]
            for item in videos
            if item["pixel_values_videos"] is not None
        ]
        if pixels:
            output["pixel_values_videos"] = torch.cat(pixels)
    if images:
        output["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in images])
        output["pixel_values"] = torch.cat([item["pixel_values"] for item in images])
    return output


def model_inputs(batch: Mapping, *, pixels: bool = True) -> dict:
    """The model's keyword arguments from a collated batch: ids, masks, labels, the grids
    (and second_per_grid_ts) of its videos and images, and with `pixels` pixel_values_videos
    (every video must have its pixels) and pixel_values; without `pixels` no pixels at all
    (pass `cached_video_features`' output as mm_encoder_outputs: it covers the images too)."""
    inputs = {key: batch[key] for key in MODEL_INPUT_KEYS}
    for key in (*VIDEO_INPUT_KEYS, *IMAGE_INPUT_KEYS):
        if key in batch:
            inputs[key] = batch[key]
    if pixels:
        if "video_grid_thw" in batch:
            if not bool(batch["has_pixels"].all()):
                raise ValueError(
                    "some videos of this batch came without pixels (their features are in "
                    "the feature cache); pass mm_encoder_outputs=cached_video_features(...) "
                    "instead"
                )
            inputs["pixel_values_videos"] = batch["pixel_values_videos"]
        if "image_grid_thw" in batch:
            inputs["pixel_values"] = batch["pixel_values"]
    return inputs


def sample_visual_inputs(batch: Mapping, position: int) -> dict:
    """The pixels and grids of one sample (its `position` in the collated batch): for a video
    sample pixel_values_videos, video_grid_thw (1, 3) and second_per_grid_ts (1,); for an
    image sample pixel_values and image_grid_thw (n, 3). Needs the pixels of every video."""
    result = {}
    videos = batch["videos_per_sample"].tolist()
    images = batch["images_per_sample"].tolist()
    if videos[position]:
        if not bool(batch["has_pixels"].all()):
            raise ValueError("some videos of this batch came without pixels (feature cache)")
        video = sum(videos[:position])
        rows = batch["video_grid_thw"].prod(-1).tolist()
        start = sum(rows[:video])
        result["pixel_values_videos"] = batch["pixel_values_videos"][start : start + rows[video]]
        result["video_grid_thw"] = batch["video_grid_thw"][video : video + 1]
        result["second_per_grid_ts"] = batch["second_per_grid_ts"][video : video + 1]
    if images[position]:
        first, count = sum(images[:position]), images[position]
        rows = batch["image_grid_thw"].prod(-1).tolist()
        start = sum(rows[:first])
        result["pixel_values"] = batch["pixel_values"][
            start : start + sum(rows[first : first + count])
        ]
        result["image_grid_thw"] = batch["image_grid_thw"][first : first + count]
    return result


# ---------------------------------------------------------------------------------------------
# Vision feature cache


class VisionFeatureCache:
    """The vision tower's per-video output (`pooler_output`, (N, D)) and patch grid (1, 3) on
    disk, keyed by `VideoConversationDataset.video_key`, reusable across runs.

    Entries are buffered and written `shard_size` at a time as safetensors shards (never
    pickle), each written to a temporary file and renamed into place; every shard lists its
    keys in its own metadata, and index.json (key -> shard, likewise written atomically) is a
    summary that is rebuilt from shard headers when it misses a shard, so several writers
    (ranks) cannot lose each other's entries. Call `flush()` after the last batch.

    fingerprint: identifies the vision tower (`vision_fingerprint`); a directory written for
    another one raises instead of serving stale features.
    """

    INDEX = "index.json"

    def __init__(
        self, directory: str | os.PathLike, *, shard_size: int = 256, fingerprint: str | None = None
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size!r}")
        self.directory = os.fspath(directory)
        self.shard_size = shard_size
        os.makedirs(self.directory, exist_ok=True)
        self._index: dict[str, str] = {}
        self._known_shards: set[str] = set()
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scanned_at: int | None = None  # the directory's mtime at the last scan
        index_path = os.path.join(self.directory, self.INDEX)
        stored = None
        if os.path.exists(index_path):
            with open(index_path, encoding="utf-8") as file:
                content = json.load(file)
            stored = content.get("fingerprint")
            self._index.update(content["entries"])
            self._known_shards.update(content["entries"].values())
        if fingerprint is not None and stored is not None and stored != fingerprint:
            raise ValueError(
                f"feature cache {self.directory} was written for vision tower {stored}, not "
                f"{fingerprint}; use another directory"
            )
        self.fingerprint = fingerprint or stored
        self._scan()

    def _scan(self) -> None:
        """Add the entries of shards the index does not list (written by other processes);
        a no-op while the directory is unchanged since the last scan."""
        changed = os.stat(self.directory).st_mtime_ns
        if changed == self._scanned_at:
            return
        self._scanned_at = changed
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".safetensors") and name not in self._known_shards:
                with safe_open(os.path.join(self.directory, name), framework="pt") as shard:
                    keys = json.loads(shard.metadata()["keys"])
                self._index.update(dict.fromkeys(keys, name))
                self._known_shards.add(name)

    def __contains__(self, key: str) -> bool:
        if key not in self._index and key not in self._pending:
            self._scan()
        return key in self._index or key in self._pending

    def __len__(self) -> int:
        return len(self._index.keys() | self._pending.keys())

    def grid(self, key: str) -> torch.Tensor | None:
        """The patch grid (1, 3) stored for `key`, or None if absent (reads only the grid)."""
        if key not in self:
            return None
        if key in self._pending:
            return self._pending[key][1]
        with safe_open(os.path.join(self.directory, self._index[key]), framework="pt") as shard:
            return shard.get_tensor(f"{key}.grid")

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D), grid (1, 3)) stored for `key`; KeyError if absent."""
        if key in self._pending:
            return self._pending[key]
        if key not in self:
            raise KeyError(f"no features cached for {key} in {self.directory}")
        path = os.path.join(self.directory, self._index[key])
        with safe_open(path, framework="pt") as shard:
            return shard.get_tensor(f"{key}.features"), shard.get_tensor(f"{key}.grid")

    def put(self, key: str, features: torch.Tensor, grid: torch.Tensor) -> None:
        """Store one video's features (N, D) and grid; written once shard_size are pending."""
        self._pending[key] = (features.detach().cpu().contiguous(), grid.reshape(1, 3).cpu())
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one shard and update the index."""
        if not self._pending:
            return
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        tensors = {}
        for key, (features, grid) in self._pending.items():
            tensors[f"{key}.features"] = features
            tensors[f"{key}.grid"] = grid
        metadata = {"keys": json.dumps(list(self._pending))}
        _atomic_write(self.directory, name, lambda path: save_file(tensors, path, metadata))
        self._index.update(dict.fromkeys(self._pending, name))
        self._known_shards.add(name)
        self._pending.clear()
        self._scan()
        content = {"fingerprint": self.fingerprint, "entries": self._index}

        def write_index(path):
            with open(path, "w", encoding="utf-8") as file:
                json.dump(content, file)

        _atomic_write(self.directory, self.INDEX, write_index)


def _atomic_write(directory: str, name: str, write) -> None:
    """Call write(temporary path) in `directory`, then rename the file to `name`."""
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, os.path.join(directory, name))
    except BaseException:
        os.unlink(temporary)
        raise


def vision_fingerprint(model) -> str:
    """A hash of a Qwen2.5-VL model's vision tower weights (reads every weight once)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_vision_tower(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _vision_tower(model):
    inner = getattr(model, "model", model)
    return inner.visual


@torch.no_grad()
def cached_video_features(model, batch: Mapping, cache: VisionFeatureCache) -> dict:
    """Vision tower outputs for a collated batch: its videos' from `cache` where present, else
    computed with `model.model.get_video_features` and stored; its images' (if any) computed
    with `get_image_features` every time (images bypass the cache).

    Returns {"video": BaseModelOutputWithPooling(pooler_output=tuple of (N_i, D) per video),
    "image": likewise per image} (each key only when the batch has such inputs), to pass as
    the model's `mm_encoder_outputs` instead of pixel values (with
    `model_inputs(batch, pixels=False)`, which keeps the grids for the 3-D positions).
    Only for a frozen vision tower: no gradient flows into it.
    """
    inner = getattr(model, "model", model)
    dtype = _vision_tower(model).dtype
    outputs = {}
    if "image_grid_thw" in batch:
        computed = inner.get_image_features(
            batch["pixel_values"].to(model.device, dtype),
            batch["image_grid_thw"].to(model.device),
            return_dict=True,
        )
        pooled = tuple(feature.to(model.device, dtype) for feature in computed.pooler_output)
        outputs["image"] = BaseModelOutputWithPooling(pooler_output=pooled)
    if "video_grid_thw" not in batch:
        return outputs
    grids = batch["video_grid_thw"]
    keys = batch["video_keys"]
    has_pixels = batch["has_pixels"].tolist()
    features: list[torch.Tensor | None] = [None] * len(keys)
    for position, key in enumerate(keys):
        if key in cache:
            features[position] = cache.get(key)[0]
    missing = [position for position, found in enumerate(features) if found is None]
    if missing:
        if not all(has_pixels[position] for position in missing):
            raise ValueError(
                "a video's features are neither in the cache nor computable: its pixels were "
                f"not loaded (was {cache.directory} changed while the data was read?)"
            )
        rows = grids.prod(-1).tolist()
        starts, offset = {}, 0
        for position, has in enumerate(has_pixels):
            if has:
                starts[position] = offset
                offset += rows[position]
        pixels = torch.cat(
            [batch["pixel_values_videos"][starts[p] : starts[p] + rows[p]] for p in missing]
        )
        output = inner.get_video_features(
            pixels.to(model.device, dtype), grids[missing].to(model.device), return_dict=True
        )
        for position, computed in zip(missing, output.pooler_output, strict=True):
            cache.put(keys[position], computed, grids[position])
            features[position] = computed
    pooled = tuple(feature.to(model.device, dtype) for feature in features)
    outputs["video"] = BaseModelOutputWithPooling(pooler_output=pooled)
    return outputs
