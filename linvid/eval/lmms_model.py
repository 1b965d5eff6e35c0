"""The `linvid` model of lmms-eval: any local Qwen2.5-VL directory, a teacher or a linvid
student, evaluated through linvid's own video path.

Registered through lmms-eval's entry-point group `lmms_eval.models` (pyproject.toml), so after
`pip install linvid[eval]`:

    lmms-eval --model linvid --model_args pretrained=DIR,fps=1,max_pixels=50176 --tasks ...

Never evaluate a student with lmms-eval's built-in `qwen2_5_vl` model: it does not know the
student's plan (a student directory makes it stop with "no file named model.safetensors",
see linvid.models.qwen2_5_vl).

Requests (lmms-eval's simple-model protocol):
- generate_until: the video is sampled and sized as `linvid ask` does (`VideoAsker`:
  qwen-vl-utils' frames, the processor's pixels and second_per_grid_ts, streaming for
  all-recurrent students), then greedy decoding; `until` strings cut the answer.
- loglikelihood: (-log p(continuation | chat prompt and video), False): the sum over the
  continuation's tokens, as linvid's option scoring computes it (`linvid.eval.options`), with
  the sign of a loss because lmms-eval's tasks pick the option with the lowest value (its own
  models return a loss); the options of one question go through one forward pass together,
  `batch_size` questions at a time. is_greedy is not computed (always False).
- generate_until_multi_round: generate_until, round after round, with the task's
  doc_to_text giving each next round's prompt.
model_args (all optional but pretrained): device (cpu, cuda, cuda:N; default cuda when
available), dtype (auto: the checkpoint's; float32, bfloat16, float16), batch_size, fps,
num_frames, max_frames, min_pixels, max_pixels, sampling (qwen, timestamps), stream (auto, on,
off), chunk_frames, tokens_per_frame (per-frame ToMe, paper 002), keep_ratio (ToMe keeping
this share of each frame, paper 001; likelihood only), transv (auto, on, off), style (auto,
standard, sandwich), max_new_tokens (when the task gives none).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from linvid.eval.ask import VideoAsker, VideoSettings
from linvid.eval.options import AnswerEncoder, question_scores
from linvid.eval.student_view import InferenceSettings, StudentView
from linvid.models.qwen_video import MAX_PIXELS, MIN_PIXELS
from linvid.video.qwen_sampling import FPS_MAX_FRAMES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWITCHES = ("auto", "on", "off")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv")


def manifest():
    """The entry point lmms-eval loads: the `linvid` model id and its class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="linvid", simple_class_path=f"{__name__}.LinvidModel")


def _switch(value, name: str) -> bool | None:
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        text = "on"
    if text in ("false", "0", "no"):
        text = "off"
    if text not in SWITCHES:
        raise ValueError(f"linvid model_args {name}={value!r}: expected one of {SWITCHES}")
    return None if text == "auto" else text == "on"


def _optional_int(value, name: str) -> int | None:
    if value is None or str(value).lower() in ("", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"linvid model_args {name}={value!r}: expected an integer") from None


@dataclass
class _Question:
    """A multiple-choice question in `linvid.eval.options`' shape: frames (T, H, W, 3),
    the prompt and the continuations to score."""

    frames: torch.Tensor
    prompt: str
    options: list


class LinvidModel(lmms):
    """lmms-eval's `linvid` model (see the module doc for model_args)."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        fps: float | str | None = 1.0,
        num_frames: int | str | None = None,
        max_frames: int | str = FPS_MAX_FRAMES,
        min_pixels: int | str = MIN_PIXELS,
        max_pixels: int | str = MAX_PIXELS,
        sampling: str = "qwen",
        stream: str = "auto",
        chunk_frames: int | str = 32,
        tokens_per_frame: int | str | None = None,
        keep_ratio: float | str | None = None,
        transv: str = "auto",
        style: str = "auto",
        max_new_tokens: int | str = 32,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"linvid model_args: unknown {', '.join(sorted(unknown))}; see "
                "linvid.eval.lmms_model for the settings it takes"
            )
        from linvid.eval.ask import check_model_directory_for_ask
        from linvid.models.transv import has_transv, set_transv_enabled

        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"linvid model_args dtype={dtype!r}: expected auto or {list(DTYPES)}")
        fps_value = None if fps is None or str(fps).lower() == "none" else float(fps)
        self.settings = VideoSettings(
            fps=None if _optional_int(num_frames, "num_frames") else fps_value,
            num_frames=_optional_int(num_frames, "num_frames"),
            max_frames=int(max_frames),
            max_pixels=int(max_pixels),
            min_pixels=int(min_pixels),
            sampling=sampling,
            chunk_frames=int(chunk_frames),
            tokens_per_frame=_optional_int(tokens_per_frame, "tokens_per_frame"),
        )
        self.settings.check()
        stream_on, transv_on = _switch(stream, "stream"), _switch(transv, "transv")
        if style not in ("auto", "standard", "sandwich"):
            raise ValueError(
                f"linvid model_args style={style!r}: expected auto, standard or sandwich"
            )
        check_model_directory_for_ask(pretrained, "pretrained")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.asker = VideoAsker.load(
            pretrained,
            self.settings,
            dtype=None if dtype == "auto" else DTYPES[dtype],
            device=device,
            style=style,
            stream=stream_on,
        )
        model = self.asker.model
        if transv_on and not has_transv(model):
            raise ValueError(f"linvid model_args transv=on: {pretrained} has no TransV layers")
        if has_transv(model) and transv_on is not None:
            set_transv_enabled(model, transv_on)
        self.view = InferenceSettings(
            prompt_style=self.asker.style,
            tokens_per_frame=self.settings.tokens_per_frame,
            keep_ratio=None if keep_ratio in (None, "None", "") else float(keep_ratio),
            transv=has_transv(model) and transv_on is not False,
        )
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.pretrained = pretrained
        self._device = torch.device(device)

    # lmms-eval reads these
    @property
    def model(self):
        return self.asker.model

    @property
    def tokenizer(self):
        return self.asker.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    # -----------------------------------------------------------------------------------------

    def _video(self, doc_to_visual, doc_id, task, split) -> str:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [visual for visual in (visuals or []) if visual is not None]
        if len(visuals) != 1 or not isinstance(visuals[0], str):
            kinds = [type(visual).__name__ for visual in visuals]
            raise ValueError(
                f"task {task}, document {doc_id}: the linvid model answers about one video file "
                f"per question; this document gives {len(visuals)} visuals ({kinds}) "
                "(images and multi-video questions are not covered)"
            )
        if not visuals[0].lower().endswith(VIDEO_SUFFIXES):
            raise ValueError(
                f"task {task}, document {doc_id}: {visuals[0]} is not a video file "
                f"({', '.join(VIDEO_SUFFIXES)})"
            )
        return visuals[0]

    def _generate(self, video: str, context: str, gen_kwargs: dict) -> str:
        gen_kwargs = dict(gen_kwargs or {})
        if float(gen_kwargs.get("temperature", 0) or 0) > 0 or gen_kwargs.get("do_sample"):
            raise ValueError("the linvid model decodes greedily: give temperature 0")
        max_new_tokens = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
        answer, _ = self.asker.answer(video, context, max_new_tokens=max_new_tokens)
        text = answer.text
        until = gen_kwargs.get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            if stop:
                text = text.split(stop)[0]
        return text

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in tqdm(requests, desc="linvid generate", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            video = self._video(doc_to_visual, doc_id, task, split)
            answers.append(self._generate(video, context, gen_kwargs))
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list:
        results = []
        for request in tqdm(requests, desc="linvid multi-round", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            video = self._video(doc_to_visual, doc_id, task, split)
            rounds = [self._generate(video, context, gen_kwargs)]
            info, round_index = None, 1
            while True:
                visuals, context, terminal, rounds, info = doc_to_text(
                    doc, previous_output=rounds, round_idx=round_index, previous_round_info=info
                )
                rounds = list(rounds)
                if terminal:
                    break
                if visuals:
                    video = visuals[0]
                rounds.append(self._generate(video, context, gen_kwargs))
                round_index += 1
            results.append([str(text) for text in rounds])  # a list: lmms-eval keeps it whole
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Each request's continuation scored after its context and video; requests that
        share (task, document, context) are one question whose options go through the model
        together."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for number, request in enumerate(requests):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            groups[(task, split, doc_id, context)].append(number)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        encoders: dict[float, AnswerEncoder] = {}
        prepare = StudentView(self.view)
        keys = list(groups)
        batch = max(1, self.batch_size)
        for start in tqdm(range(0, len(keys), batch), desc="linvid loglikelihood",
                          disable=self.rank != 0):  # fmt: skip
            chunk = keys[start : start + batch]
            by_rate: dict[float, list] = defaultdict(list)
            for key in chunk:
                task, split, doc_id, context = key
                first = requests[groups[key][0]]
                video = self._video(first.args[2], doc_id, task, split)
                frames, plan = self.asker.frames(video)
                if not isinstance(frames, torch.Tensor):
                    frames = torch.cat(list(frames))
                options = [requests[number].args[1] for number in groups[key]]
                question = _Question(frames.permute(0, 2, 3, 1), context, options)
                by_rate[plan.sample_fps].append((key, question))
            for rate, items in by_rate.items():
                if rate not in encoders:
                    encoders[rate] = AnswerEncoder(
                        self.tokenizer,
                        self.model.config,
                        style=self.asker.style,
                        sample_fps=rate,
                        processor=self.asker.processor,
                    )
                questions = [question for _, question in items]
                scored = question_scores(self.model, questions, None, encoders[rate], prepare)
                for (key, _), values in zip(items, scored, strict=True):
                    for number, value in zip(groups[key], values.tolist(), strict=True):
                        results[number] = (-float(value), False)
        return results
