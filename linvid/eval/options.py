"""Multiple-choice questions about a video, answered by likelihood: each option's text is
scored as the model's answer (the sum of its tokens' log-probabilities after the chat prompt,
as lmms-eval's loglikelihood path does) and the best-scoring option is the choice. Given the
prompt text, an option's score does not depend on the other options or their order (a prompt
that lists the options changes with their order, and only through it), so a circular
evaluation (every rotation of the options) stays meaningful.

Works for a Qwen2.5-VL teacher and for linvid students (same forward signature). A question is
any object with `frames` ((T, H, W, 3) uint8, numpy or torch), `options` (option texts) and a
prompt (`prompt` attribute, or given by the caller), optionally `answer_index` and `task`.

The same token layout serves training (`AnswerEncoder.item` / `.batch`): the chat prompt with
the video placeholder expanded, then the answer's tokens, labelled, and the end-of-turn token.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from linvid.distill.data import END_OF_TURN, IGNORE_INDEX, collate, model_inputs
from linvid.eval.prompts import VIDEO_PLACEHOLDER, render_video_prompt, video_messages
from linvid.models.qwen_video import (
    FRAME_LIST_FPS,
    pixel_statistics,
    video_inputs,
    video_token_count,
)


def frames_tensor(frames) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames (numpy or torch) as the (T, 3, H, W) tensor video_inputs
    takes."""
    video = (
        torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    )
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {tuple(video.shape)}")
    return video.permute(0, 3, 1, 2)


class AnswerEncoder:
    """Builds `collate` items (prompt + answer, answer-only labels) for one model's tokenizer and
    vision config; remembers rendered prompts (the chat template is slow next to a tiny model).

    resize: False keeps the frames' own size (it must be a multiple of patch * merge, e.g. 56);
    True resizes as Qwen2-VL's processor does. Pixel statistics come from the config
    (`pixel_statistics`). sample_fps: frames per second of the videos given (their
    second_per_grid_ts is temporal_patch_size / sample_fps, as Qwen's processor computes it);
    by default qwen-vl-utils' rate for a list of frames (FRAME_LIST_FPS). processor: a
    checkpoint's Qwen2.5-VL processor (`load_processor`): its video processor makes the pixels
    (the same ones within 1e-5; its image mean / std must be the model's)."""

    def __init__(
        self,
        tokenizer,
        config,
        *,
        style: str = "standard",
        resize: bool = False,
        sample_fps: float = FRAME_LIST_FPS,
        processor=None,
    ):
        self.processor = processor
        self.tokenizer = tokenizer
        self.config = config
        self.vision_config = config.vision_config
        self.style = style
        self.resize = resize
        self.sample_fps = sample_fps
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER)
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.pad_token_id = tokenizer.pad_token_id
        self._prompts: dict[tuple[str, int], list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def video(self, frames) -> dict:
        """`video_inputs` of (T, H, W, 3) frames: pixel_values_videos (P, C), video_grid_thw
        (1, 3) and second_per_grid_ts (1,)."""
        kwargs = {"min_pixels": 0} if self.resize else {}
        return video_inputs(
            frames_tensor(frames),
            self.vision_config,
            sample_fps=self.sample_fps,
            statistics=pixel_statistics(self.config),
            processor=self.processor,
            resize=self.resize,
            **kwargs,
        )

    def prompt_ids(self, prompt: str, video_tokens: int) -> list[int]:
        key = (prompt, video_tokens)
        if key not in self._prompts:
            if len(self._prompts) >= 100_000:  # bounded for open-ended prompts
                self._prompts.clear()
            messages = video_messages(prompt, style=self.style)
            self._prompts[key] = render_video_prompt(self.tokenizer, messages, video_tokens)
        return self._prompts[key]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answers:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"answer {answer!r} has no tokens")
            self._answers[answer] = ids
        return self._answers[answer]

    def item(
        self,
        prompt: str,
        answer: str,
        video: dict,
        *,
        end_of_turn: bool = True,
        index: int = 0,
    ) -> dict:
        """One `collate` item: prompt, then the answer's tokens (labelled) and, with
        `end_of_turn`, <|im_end|> (labelled too: training stops the turn there). video: the
        `video` method's output."""
        grid = video["video_grid_thw"]
        count = video_token_count(grid, self.vision_config.spatial_merge_size)
        prompt_ids = self.prompt_ids(prompt, count)
        answer_ids = self.answer_ids(answer) + ([self.end_of_turn_id] if end_of_turn else [])
        ids = torch.tensor(prompt_ids + answer_ids)
        labels = torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
        return {
            "input_ids": ids,
            "labels": labels,
            "mm_token_type_ids": (ids == self.video_token_id).long() * 2,
            "pixel_values_videos": video["pixel_values_videos"],
            "video_grid_thw": grid.reshape(1, 3).long(),
            "second_per_grid_ts": video["second_per_grid_ts"].reshape(1).float(),
            "video_key": "",
            "sample_index": index,
        }

    def batch(self, items: Sequence[dict]) -> dict:
        """Model inputs (right-padded; labels -100 outside the answers) of `item`s."""
        return model_inputs(collate(items, self.pad_token_id))


def _prompt_of(question, prompt: str | Callable | None) -> str:
    if callable(prompt):
        return prompt(question)
    if prompt is not None:
        return prompt
    if not hasattr(question, "prompt"):
        raise ValueError(
            f"{type(question).__name__} has no `prompt`; pass prompt= (a string or a function "
            "of the question)"
        )
    return question.prompt


def answer_log_likelihoods(model, batch: dict) -> torch.Tensor:
    """Sum over each row of log p(labelled token | everything before it), (B,) float32."""
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    labelled = labels != IGNORE_INDEX
    first = int(labelled.float().argmax(-1).min())  # the earliest labelled position of any row
    keep = labels.shape[1] - first + 1  # logits from the position predicting `first`
    device = next(model.parameters()).device
    inputs = {  # prepared inputs may hold encoder outputs and ints (TransV's prompt length)
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in inputs.items()
    }
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
    logits = logits[:, -keep:-1]  # position p predicts token p + 1
    targets = labels[:, first:].to(device)
    log_probs = torch.log_softmax(logits, dim=-1)
    mask = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1).cpu()


@torch.no_grad()
def option_scores(
    model,
    tokenizer,
    question,
    *,
    prompt: str | Callable | None = None,
    style: str = "standard",
    prepare: Callable | None = None,
    encoder: AnswerEncoder | None = None,
) -> torch.Tensor:
    """Log-likelihood of each option's text as the answer to `question`, (len(options),):
    the sum of the option's tokens' log-probabilities after the chat prompt (no end-of-turn
    token, as lmms-eval scores a continuation). All options go through one forward pass,
    right-padded (the prompt is the same in every row, so padding never shifts a position).

    prompt: the prompt text, or a function question -> text (default: question.prompt).
    style: "standard" or "sandwich" prompts (`video_messages`). prepare: an optional
    `prepare(model, batch) -> batch` applied before the forward (e.g. a student's per-frame
    ToMe or TransV settings); it may shorten rows as long as labels follow their tokens."""
    encoder = encoder or AnswerEncoder(tokenizer, model.config, style=style)
    return question_scores(model, [question], prompt, encoder, prepare)[0]


def choose_option(model, tokenizer, question, **kwargs) -> int:
    """Index of the option with the highest `option_scores` (the first on ties)."""
    return int(option_scores(model, tokenizer, question, **kwargs).argmax())


def question_scores(model, questions, prompt, encoder, prepare) -> list[torch.Tensor]:
    """Option scores of each question (a list of (len(options),) tensors). `prompt`: the
    prompt text, a function of the question, or None (question.prompt). Rows go through the
    model in groups that share their video's shape and prompt length (one forward for a whole
    group), so that `prepare` sees uniform rows; right padding handles the options' different
    lengths."""
    items, owners, videos = [], [], {}
    for number, question in enumerate(questions):
        text = _prompt_of(question, prompt)
        if id(question.frames) not in videos:  # rotations of a question share its frames
            videos[id(question.frames)] = encoder.video(question.frames)
        video = videos[id(question.frames)]
        for option in question.options:
            items.append(encoder.item(text, option, video, end_of_turn=False))
            owners.append(number)
    groups = defaultdict(list)
    for row, item in enumerate(items):
        prompt_length = int((item["labels"] == IGNORE_INDEX).sum())
        groups[(tuple(item["video_grid_thw"].flatten().tolist()), prompt_length)].append(row)
    flat = torch.empty(len(items))
    was_training = model.training
    model.eval()
    try:
        for rows in groups.values():
            batch = _encoded_once(model, [items[row] for row in rows], encoder)
            if prepare is not None:
                batch = prepare(model, batch)
            flat[rows] = answer_log_likelihoods(model, batch)
    finally:
        model.train(was_training)
    owners = torch.tensor(owners)
    return [flat[owners == number] for number in range(len(questions))]


def _encoded_once(model, items: Sequence[dict], encoder: AnswerEncoder) -> dict:
    """`encoder.batch(items)` with each distinct video (by tensor identity) through the vision
    tower once: its features go to every row that shows it, as `mm_encoder_outputs`."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    batch = encoder.batch(items)
    videos: dict[int, dict] = {}  # id of a video's pixels -> the first item showing it
    for item in items:
        videos.setdefault(id(item["pixel_values_videos"]), item)
    position = {key: index for index, key in enumerate(videos)}
    device = next(model.parameters()).device
    pixels = torch.cat([item["pixel_values_videos"] for item in videos.values()])
    grids = torch.cat([item["video_grid_thw"] for item in videos.values()])
    features = model.get_video_features(
        pixels.to(device, model.dtype), grids.to(device), return_dict=True
    ).pooler_output
    rows = tuple(features[position[id(item["pixel_values_videos"])]] for item in items)
    batch.pop("pixel_values_videos")
    batch["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=rows)}
    return batch


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    questions: Sequence,
    *,
    prompt: Callable | None = None,
    style: str = "standard",
    prepare: Callable | None = None,
    batch_questions: int = 4,
    encoder: AnswerEncoder | None = None,
) -> dict:
    """Accuracy of likelihood choices over `questions` (each with `answer_index`).

    Returns {"accuracy": {task: fraction, ..., "all": fraction}, "count": {task: n},
    "records": [{"task", "num_frames", "depth", "choice", "answer_index", "correct",
    "scores"}, ...]}. `batch_questions` questions' options share one forward pass.
    prompt: a function question -> prompt text, when questions have no `prompt` attribute.
    style, prepare: as in `option_scores`."""
    encoder = encoder or AnswerEncoder(tokenizer, model.config, style=style)
    records = []
    for start in range(0, len(questions), batch_questions):
        chunk = questions[start : start + batch_questions]
        for question, scores in zip(
            chunk, question_scores(model, chunk, prompt, encoder, prepare), strict=True
        ):
            choice = int(scores.argmax())
            records.append(
                {
                    "task": getattr(question, "task", ""),
                    "num_frames": int(question.frames.shape[0]),
                    "depth": getattr(question, "depth", None),
                    "choice": choice,
                    "answer_index": int(question.answer_index),
                    "correct": choice == int(question.answer_index),
                    "scores": [round(float(score), 4) for score in scores],
                }
            )
    totals, hits = defaultdict(int), defaultdict(int)
    for record in records:
        for key in (record["task"], "all"):
            totals[key] += 1
            hits[key] += record["correct"]
    accuracy = {key: hits[key] / totals[key] for key in totals}
    return {"accuracy": accuracy, "count": dict(totals), "records": records}
