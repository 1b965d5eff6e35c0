"""Sums of log decays that stay exact: every helper sums exactly the terms it spans, never the
difference of two long cumulative sums (which would lose a small exponent next to a large
one), and every exponent it produces for a causal pair is <= 0."""

from __future__ import annotations

import torch


def sum_before(log_decay: torch.Tensor, dim: int) -> torch.Tensor:
    """out[t] = sum_{j < t} log_decay[j] along `dim` (0 at the first position)."""
    return _strict_prefix_sums(log_decay, dim, reverse=False)


def sum_after(log_decay: torch.Tensor, dim: int) -> torch.Tensor:
    """out[t] = sum_{j > t} log_decay[j] along `dim` (0 at the last position)."""
    return _strict_prefix_sums(log_decay, dim, reverse=True)


def _strict_prefix_sums(log_decay, dim, reverse):
    # A cumulative sum, not a 0/1 triangular matmul: the matmul would turn a -inf decay (a full
    # reset, what -exp(logits) gives on overflow) into 0 * -inf = nan, and float32 matmuls may
    # run in TF32 or bf16 (torch.set_float32_matmul_precision) and round the exponents.
    if reverse:
        return _strict_prefix_sums(log_decay.flip(dim), dim, reverse=False).flip(dim)
    dim = dim % log_decay.ndim
    shifted = log_decay.narrow(dim, 0, log_decay.shape[dim] - 1)
    padding = [0, 0] * (log_decay.ndim - 1 - dim) + [1, 0]
    return torch.nn.functional.pad(shifted, padding).cumsum(dim)


def segment_sum(log_decay: torch.Tensor) -> torch.Tensor:
    """out[..., t, s] = sum_{s < j <= t} log_decay[..., j] for s <= t, -inf above the diagonal.

    log_decay: (..., L). Returns (..., L, L); exp() of it is the causal decay matrix of a scalar
    recurrence h_t = exp(log_decay_t) h_{t-1} + ... (Mamba-2's "segsum", paper 002/003 SSD).
    """
    length = log_decay.shape[-1]
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=log_decay.device).tril(-1)
    # terms[j, s] = log_decay[j] for j > s; its cumulative sum over j is the segment sum.
    terms = log_decay.unsqueeze(-1).expand(*log_decay.shape, length)
    sums = terms.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    return sums.masked_fill(
        ~strictly_lower.logical_or(torch.eye(length, dtype=torch.bool, device=log_decay.device)),
        float("-inf"),
    )
