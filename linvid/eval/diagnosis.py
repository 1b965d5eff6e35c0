"""Why a linear student loses what its teacher keeps: two measurements on held-out inputs.

- **Memory of the video** (`decay_memory`): every RWKV-6 time-mix and every forward Mamba-2
  scan decays its state by a per-token, per-channel factor a_t = exp(w_t) (RWKV-6, paper 000
  eq. 1 / paper 001 §3.2; Mamba-2 dt_t * A, paper 002 §3.1 / paper 003 eq. 2). What the state
  wrote at the video's first token is still there, when the model reads the last prompt token
  (the one that predicts the answer), times prod_{t0 < t <= end} a_t. Per layer this module
  reports the median per-token half-life ln(1/2) / w_t (in tokens) and, per channel (RWKV-6:
  H*K channels; Mamba-2: H heads), that retention: the share of channels that keep more than
  1% of the first video token, and the median of log10 retention. A layer whose channels all
  forget the first frame before the question cannot answer "which needle came first".
- **Teacher-forced layer error** (`layer_errors`): each converted layer's mixer, run on the
  teacher's own input to that layer (`linvid.distill.hidden.teacher_forced_outputs`, what
  paper 003 eq. 6 trains), against the teacher attention's output: the relative squared error
  sum ||s - t||^2 / sum ||t||^2 over real tokens, overall, on vision and on text tokens, and
  per position bin (equal quarters of each sample's real tokens). An error that grows with the
  position or with the video's length is the mixer failing to stand in for attention over long
  contexts, before any error compounds through the layers above.

Both run one forward on a batch of model inputs (`linvid.eval.options.AnswerEncoder.batch`,
after a student's `StudentView` when it merges frames); the layer error needs the teacher to
see the student's tokens, so it is for students without token merging.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from linvid.layers.mamba2 import Mamba2Scan
from linvid.layers.rwkv6 import RWKV6TimeMix

__all__ = ["decay_memory", "layer_errors", "scored_span"]

# A channel "remembers" the first video token when more than this share of it is left.
REMEMBERED = 0.01


def scored_span(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, end) LongTensors (B,): each sample's first vision token (mm_token_type_ids > 0)
    and the last token before its answer (the first labelled token - 1; without labels, the
    last real token). A sample without any vision token is refused by name."""
    types = inputs.get("mm_token_type_ids")
    if types is None:
        raise ValueError("inputs need mm_token_type_ids to find the video tokens")
    vision = types > 0
    if not bool(vision.any(dim=1).all()):
        raise ValueError("every sample needs a video or an image to measure memory of it")
    first = vision.int().argmax(dim=1)
    labels = inputs.get("labels")
    if labels is not None and bool((labels != -100).any(dim=1).all()):
        end = (labels != -100).int().argmax(dim=1) - 1
    else:
        mask = inputs.get("attention_mask")
        lengths = mask.sum(dim=1) if mask is not None else torch.full_like(first, types.shape[1])
        end = lengths - 1
    return first, end


@contextmanager
def _recorded_inputs(model):
    """Record the hidden_states (and context) each RWKV6TimeMix and forward Mamba2Scan gets
    during one forward: yields a list of (name, module, args, kwargs), in call order."""
    calls = []
    handles = []
    for name, module in model.named_modules():
        scan = isinstance(module, Mamba2Scan) and not name.endswith("reverse_scan")
        if isinstance(module, RWKV6TimeMix) or scan:

            def hook(module, args, kwargs, name=name):
                calls.append((name, module, args, kwargs))

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _log_decays(module, args, kwargs) -> torch.Tensor:
    """(B, L, channels) float32 log decays of one recorded call (0 where nothing decays)."""
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if isinstance(module, RWKV6TimeMix):
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        state = kwargs.get("state", args[2] if len(args) > 2 else None)
        return module.log_decays(hidden_states, context, state).flatten(2)
    write_mask = kwargs.get("write_mask", args[3] if len(args) > 3 else None)
    log_decay = module.log_decays(hidden_states)
    if write_mask is not None:
        log_decay = torch.where(write_mask[..., None], log_decay, 0.0)
    return log_decay


def _layer_of(name: str) -> int:
    """The decoder layer index in a module name (...layers.N....)."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


@torch.no_grad()
def decay_memory(model, inputs: dict) -> list[dict]:
    """Memory of the video in each recurrent part of `model` (module docstring).

    inputs: one batch of model inputs with mm_token_type_ids (and labels to mark the answer).
    Returns one row per RWKV-6 time-mix / forward Mamba-2 scan, in layer order:
    {"layer", "module", "kind", "median_half_life" (tokens), "remembering" (share of channels
    keeping > 1% of the first video token at the end, over samples and channels),
    "median_log10_retention", "span" (mean tokens from the first video token to the end)}.
    """
    first, end = scored_span(inputs)
    with _recorded_inputs(model) as calls:
        model(**inputs, use_cache=False)
    if not calls:
        raise ValueError("the model has no RWKV-6 or Mamba-2 layer to measure")
    rows = []
    for name, module, args, kwargs in calls:
        log_decay = _log_decays(module, args, kwargs)  # (B, L, C)
        positions = torch.arange(log_decay.shape[1], device=log_decay.device)
        after = (positions[None] > first[:, None]) & (positions[None] <= end[:, None])  # (B, L)
        retained = (log_decay * after[..., None]).sum(dim=1) / math.log(10)  # (B, C) log10
        decaying = log_decay[after] if bool(after.any()) else log_decay.flatten(0, 1)
        half_life = math.log(0.5) / decaying.clamp(max=-1e-12)
        rows.append(
            {
                "layer": _layer_of(name),
                "module": name,
                "kind": "rwkv6" if isinstance(module, RWKV6TimeMix) else "mamba2",
                "median_half_life": float(half_life.median()),
                "remembering": float((retained > math.log10(REMEMBERED)).float().mean()),
                "median_log10_retention": float(retained.median()),
                "span": float((end - first).float().mean()),
            }
        )
    return rows


@torch.no_grad()
def layer_errors(student, teacher, inputs: dict, bins: int = 4) -> list[dict]:
    """Teacher-forced error of each converted layer (module docstring).

    student, teacher: the models, fed the same tokens (`inputs`, with mm_token_type_ids);
    bins: position bins over each sample's real tokens. Returns one row per converted layer:
    {"layer", "relative_error", "vision", "text", "by_position": [bins floats]}, each a
    relative squared error (0 = the teacher's output; 1 = as far as predicting zeros)."""
    from linvid.distill.hidden import teacher_forced_outputs

    if bins < 1:
        raise ValueError(f"bins must be a positive number of position bins, got {bins}")
    outputs = teacher_forced_outputs(student, teacher, inputs)
    mask = inputs.get("attention_mask")
    sample = next(iter(outputs.values()))[1]
    real = mask.bool() if mask is not None else torch.ones(sample.shape[:2], dtype=torch.bool)
    vision = inputs["mm_token_type_ids"] > 0
    lengths = real.sum(dim=1, keepdim=True)
    positions = torch.arange(real.shape[1])[None].expand_as(real)
    position_bin = (positions * bins // lengths.clamp(min=1)).clamp(max=bins - 1)

    def relative(error, target, where):
        where = where & real
        total = target[where].sum()
        return float(error[where].sum() / total) if bool(where.any()) and total > 0 else None

    rows = []
    for index, (output, target) in outputs.items():
        error = (output.float() - target.float()).pow(2).sum(dim=-1)  # (B, L)
        norm = target.float().pow(2).sum(dim=-1)
        rows.append(
            {
                "layer": index,
                "relative_error": relative(error, norm, real),
                "vision": relative(error, norm, vision),
                "text": relative(error, norm, ~vision),
                "by_position": [relative(error, norm, position_bin == b) for b in range(bins)],
            }
        )
    return rows
