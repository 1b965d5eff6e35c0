"""How a student reads a video question when it is scored: its prompt style, per-frame ToMe
and TransV (`InferenceSettings`), and the `prepare(model, batch)` that applies them to an option
scoring batch (`StudentView`). Used by the demo and by the lmms-eval plugin."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InferenceSettings:
    """How a distilled student reads a video question: prompt_style ("standard" or
    "sandwich"), per-frame ToMe (tokens_per_frame, or keep_ratio of each frame's tokens;
    None: no merge) and whether it runs TransV."""

    prompt_style: str = "standard"
    tokens_per_frame: int | None = None
    keep_ratio: float | None = None
    transv: bool = False

    @property
    def merges_frames(self) -> bool:
        return self.tokens_per_frame is not None or (self.keep_ratio or 1.0) < 1.0

    def describe(self) -> str:
        parts = [f"{self.prompt_style} prompts"]
        if self.tokens_per_frame is not None:
            parts.append(f"ToMe to {self.tokens_per_frame} tokens/frame")
        elif self.merges_frames:
            parts.append(f"ToMe keeping {self.keep_ratio:.0%} of each frame")
        if self.transv:
            parts.append("TransV")
        return ", ".join(parts)


class StudentView:
    """A `prepare(model, batch) -> batch` for `linvid.eval.options`: merges each frame of the
    batch's videos after the vision tower (labels follow) and sets TransV's prompt length, as
    the student was trained. Every row of a batch must share its video size and, with
    TransV, its prompt length."""

    def __init__(self, settings: InferenceSettings):
        self.settings = settings

    def __call__(self, model, batch: dict) -> dict:
        from linvid.models.frame_tome import merged_video_batch

        if self.settings.merges_frames:
            with torch.no_grad():
                batch = merged_video_batch(
                    model, batch, self.settings.tokens_per_frame, self.settings.keep_ratio
                )
        if self.settings.transv:
            labelled = batch["labels"] != -100
            starts = {int(row.nonzero()[0]) for row in labelled}
            if len(starts) != 1:
                raise ValueError(
                    f"a TransV student scores one prompt length per call, got {sorted(starts)}"
                )
            batch = {**batch, "transv_prompt_length": starts.pop()}
        return batch
