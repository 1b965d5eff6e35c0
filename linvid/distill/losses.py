"""Distillation losses: pure functions on tensors, no model knowledge.

Conventions shared by every function here:

- Alignment is transformers' causal-LM convention: `logits` (B, L, V) come straight from a
  forward pass over `input_ids` (B, L), and `labels` / `mask` (B, L) are aligned with
  `input_ids`, not with the logits. The functions shift internally: the distribution at
  position t (logits[:, t]) is scored against token t + 1 (labels[:, t + 1], mask[:, t + 1]).
  So `labels` is a copy of `input_ids` with -100 on tokens that are not scored (prompt,
  vision, padding), exactly what transformers' own `loss_function` expects, and a KL `mask`
  can be `labels != -100`. Column 0 of labels/mask is never scored (nothing predicts it).
  `hidden_mse` compares hidden states position by position and does not shift.
- Reduction is a mean over scored tokens of the whole batch (not a mean of per-sample means),
  as transformers' cross-entropy does with ignore_index. With no scored token the loss is 0
  (never NaN) and its gradient is zeros.
- Arithmetic is in float32 (float64 inputs stay float64): bf16 logits are upcast chunk by
  chunk, and log_softmax keeps large logits finite.
- Large vocabularies (V ~ 150K): with `chunk_size`, scored tokens are processed
  `chunk_size` rows at a time under activation checkpointing, so only one chunk's float32
  (chunk_size, V) softmax exists at a time, in the forward and in the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.utils.checkpoint import checkpoint

from linvid.ops.validation import check_positive_int, check_shape, check_tensor, describe

IGNORE_INDEX = -100


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Token-level KD: forward KL(teacher || student) of temperature-softened distributions.

    paper 003 eq. 7 (and paper 000 eq. 15 with tau = 1):
        L_tok = tau^2 / T * sum_t KL(p_T^tau || p_S^tau),  p^tau = softmax(z / tau)
    where t runs over scored tokens (mask) of the whole batch; the tau^2 factor (Hinton et al.)
    keeps gradient magnitudes comparable across temperatures.

    student_logits, teacher_logits: (B, L, V), any float dtype (the teacher usually detached).
    mask: (B, L) bool, aligned with input_ids: True marks tokens whose prediction is compared
        (the distributions at position t - 1; see the module docstring).
    Returns a scalar in float32 (float64 for float64 inputs).
    """
    batch, length, vocab = _check_logits("student_logits", student_logits)
    check_tensor("teacher_logits", teacher_logits, 3, "(B, L, V)")
    check_shape("teacher_logits", teacher_logits, (batch, length, vocab), "(B, L, V)")
    _check_mask("mask", mask, (batch, length))
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)

    scored = mask[:, 1:]
    student_rows = student_logits[:, :-1][scored]  # (N, V)
    teacher_rows = teacher_logits[:, :-1][scored]  # (N, V)

    def kl_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(student)
        log_q = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
        log_p = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
        p = log_p.exp()
        # 0 * log 0 = 0: a teacher probability of exactly 0 (logit -inf) contributes nothing.
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
        return terms.sum()

    total = _sum_over_row_chunks(kl_sum, (student_rows, teacher_rows), chunk_size)
    return total * temperature**2 / max(student_rows.shape[0], 1)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy, mean over labels that are not -100.

    Serves three equations with different labels:
    - ground-truth supervision: paper 000 eq. 16's CE term, paper 003 eq. 9 (labels = answer);
    - sequence-level KD, paper 003 eq. 8 (labels = the teacher's own greedy decode, see
      `sequence_kd`, which is this function).
        L = -1/T * sum_t log p_S(y_t | x, y_<t)

    logits: (B, L, V), any float dtype.
    labels: (B, L) integer, aligned with input_ids (shifted here: logits[:, t] scores
        labels[:, t + 1]), -100 where not scored. Same as transformers' ForCausalLMLoss.
    Returns a scalar in float32 (float64 for float64 inputs).
    """
    batch, length, _ = _check_logits("logits", logits)
    _check_labels("labels", labels, (batch, length))
    _check_chunk_size(chunk_size)

    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    logit_rows = logits[:, :-1][scored]  # (N, V)
    target_rows = targets[scored]  # (N,)

    def negative_log_likelihood_sum(rows: torch.Tensor, rows_targets: torch.Tensor):
        log_probs = torch.log_softmax(rows.to(_compute_dtype(rows)), dim=-1)
        return -log_probs.gather(-1, rows_targets[:, None]).sum()

    total = _sum_over_row_chunks(negative_log_likelihood_sum, (logit_rows, target_rows), chunk_size)
    return total / max(logit_rows.shape[0], 1)


# Sequence-level KD (paper 003 eq. 8) is cross-entropy whose labels are the teacher's greedy
# decode of the prompt (prompt positions -100); the student is run on prompt + that decode.
# One function under the name recipes use.
sequence_kd = cross_entropy


HIDDEN_REDUCTIONS = ("paper", "mean")


def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    reduction: str = "paper",
) -> torch.Tensor:
    """Hidden-state matching of one layer (paper 003 eq. 6 for one layer l).

    reduction "paper": 1/N * sum_t ||h_S[l, t] - h_T[l, t]||^2, the squared distance summed
    over the D channels and averaged over the N scored tokens, so that the paper's
    lambda = 0.5 weighs L_hid against L_tok as the paper does. "mean": also divided by D (the
    F.mse_loss scale: the weight then does not depend on the model width, but L_hid is D times
    weaker; 3584x for Qwen2.5-VL-7B). Eq. 6 then averages over the distilled layers; callers
    average the per-layer values.

    student_hidden, teacher_hidden: (B, L, D), e.g. a student mixer's output and the replaced
        attention's output for the same input.
    mask: (B, L) bool or None (all tokens); compared position by position, no shift.
    Returns a scalar in float32 (float64 for float64 inputs); 0 with zero gradient if the mask
    selects no token.
    """
    if reduction not in HIDDEN_REDUCTIONS:
        raise ValueError(
            f"unknown hidden-loss reduction {reduction!r}; expected one of {HIDDEN_REDUCTIONS}"
        )
    check_tensor("student_hidden", student_hidden, 3, "(B, L, D)")
    check_tensor("teacher_hidden", teacher_hidden, 3, "(B, L, D)")
    check_shape("teacher_hidden", teacher_hidden, tuple(student_hidden.shape), "(B, L, D)")
    if mask is not None:
        _check_mask("mask", mask, tuple(student_hidden.shape[:2]))
        student_hidden = student_hidden[mask]  # (N, D)
        teacher_hidden = teacher_hidden[mask]
    dtype = _compute_dtype(student_hidden)
    difference = student_hidden.to(dtype) - teacher_hidden.to(dtype)
    count = difference.numel() if reduction == "mean" else difference.shape[:-1].numel()
    return difference.square().sum() / max(count, 1)


def combined_ce_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    alpha: float,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Stage-3 objective of paper 000: alpha * CE(labels) + beta * KL(teacher || student).

    paper 000 eq. 16 as its §5 ablation states it, L = alpha * L_CE + beta * L_KL (the printed
    eq. 15/16 carry a sign slip: -E_T[log pi_T / pi_S] is minus the KL). The paper uses
    temperature 1 and finds (alpha, beta) = (0, 1) best.

    student_logits, teacher_logits: (B, L, V). labels: (B, L) integer with -100 ignored.
    mask: (B, L) bool for the KL term; None uses `labels != -100` (the same tokens as CE).
    Alignment and reductions as in `cross_entropy` and `token_kl`.
    """
    if mask is None:
        batch, length, _ = _check_logits("student_logits", student_logits)
        _check_labels("labels", labels, (batch, length))
        mask = labels != IGNORE_INDEX
    supervised = cross_entropy(student_logits, labels, chunk_size=chunk_size)
    distilled = token_kl(
        student_logits, teacher_logits, mask, temperature=temperature, chunk_size=chunk_size
    )
    return alpha * supervised + beta * distilled


# The names recipes use for loss terms (paper 003 §3.2: hid, tok, seq, sup). "sequence" and
# "ce" are the same function; they differ in the labels the recipe passes.
LOSS_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "kl": token_kl,
    "hidden": hidden_mse,
    "sequence": sequence_kd,
    "ce": cross_entropy,
}


def weighted_total(
    values: Mapping[str, torch.Tensor], weights: Mapping[str, float]
) -> torch.Tensor:
    """sum_name weights[name] * values[name], e.g. paper 003 eq. 10-13 with every lambda 0.5.

    values: loss name -> scalar tensor, the names of `LOSS_FUNCTIONS`.
    weights: loss name -> float; every weighted name must have a value and vice versa.
    """
    for name in list(values) + list(weights):
        if name not in LOSS_FUNCTIONS:
            raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSS_FUNCTIONS)}")
    if set(values) != set(weights) or not values:
        raise ValueError(
            f"loss values and weights must name the same non-empty set of losses, got values "
            f"{sorted(values)} and weights {sorted(weights)}"
        )
    return sum(weights[name] * values[name] for name in weights)


def _sum_over_row_chunks(
    function: Callable[..., torch.Tensor],
    rows: tuple[torch.Tensor, ...],
    chunk_size: int | None,
) -> torch.Tensor:
    """Sum of function(*chunk) over row chunks of `rows` (all with the same first axis).

    Each chunk runs under non-reentrant checkpointing when it needs gradients, so autograd
    stores only the input rows and recomputes the float32 softmax in the backward pass.
    """
    count = rows[0].shape[0]
    if chunk_size is None or count <= chunk_size:
        return function(*rows)
    total = None
    for start in range(0, count, chunk_size):
        chunk = tuple(tensor[start : start + chunk_size] for tensor in rows)
        if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in chunk):
            value = checkpoint(function, *chunk, use_reentrant=False)
        else:
            value = function(*chunk)
        total = value if total is None else total + value
    return total


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half/bf16/float32 inputs, float64 for float64 (gradcheck)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_logits(name: str, logits) -> tuple[int, int, int]:
    check_tensor(name, logits, 3, "(B, L, V)")
    if logits.shape[1] < 1 or logits.shape[2] < 1:
        raise ValueError(f"{name} must have L >= 1 and V >= 1 (B, L, V), got {describe(logits)}")
    return tuple(logits.shape)


def _check_mask(name: str, mask, expected: tuple) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = describe(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor (B, L) = {tuple(expected)}, got {got}")
    check_shape(name, mask, expected, "(B, L)")


def _check_labels(name: str, labels, expected: tuple) -> None:
    if (
        not isinstance(labels, torch.Tensor)
        or labels.is_floating_point()
        or labels.dtype == (torch.bool)
    ):
        got = describe(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"{name} must be an integer tensor (B, L) = {tuple(expected)} with -100 for "
            f"unscored tokens, got {got}"
        )
    check_shape(name, labels, expected, "(B, L)")


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
