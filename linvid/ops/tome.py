"""Token merging (ToMe) with size tracking and size-sorted output, as AuroraLong applies it
inside every ViT layer (paper 001 §3.1 and Algorithm 1, "Sorted Token Merge").

One merge is described by a single index tensor: `destination[b, i]` is the output slot of
input token i. Merging any tensor laid out (B, N, ...) is then one scatter, and the same
merge (including the reordering by size) can be replayed on positions, masks or the features
of another layer. Conventions: DESIGN.md, "Math conventions", Token merging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linvid.ops.validation import check_positive_int, check_shape, check_tensor, describe

ORDERS = ("ascending", "descending", "none")


@dataclass(frozen=True)
class TokenMerge:
    """A merge of N tokens into M = N - r output tokens, in output order.

    destination: (B, N) long, output slot in [0, M) of every input token.
    input_size: (B, N) float, patches represented by every input token (the merge weights).
    size: (B, M) float, patches represented by every output token (sums of `input_size`).
    """

    destination: torch.Tensor
    input_size: torch.Tensor
    size: torch.Tensor

    def merge(self, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Combine the input tokens of each output slot: (B, N, ...) -> (B, M, ...).

        `reduce` is any `torch.Tensor.scatter_reduce` mode ("sum", "mean", "amax", "amin",
        "prod"); e.g. "amin" keeps the first position of a merged token.
        """
        batch, tokens = self.destination.shape
        if tuple(values.shape[:2]) != (batch, tokens):
            raise ValueError(
                f"values must have shape (B, N, ...) with (B, N) = {(batch, tokens)}, "
                f"got {describe(values)}"
            )
        trailing = values.shape[2:]
        index = self.destination.view(batch, tokens, *(1,) * len(trailing)).expand_as(values)
        merged = values.new_zeros(batch, self.size.shape[1], *trailing)
        return merged.scatter_reduce(1, index, values, reduce=reduce, include_self=False)

    def average(self, x: torch.Tensor) -> torch.Tensor:
        """Size-weighted mean of the tokens merged into each slot: (B, N, ...) -> (B, M, ...).

        Accumulates in float32 (or float64 for float64 input) and returns x's dtype, so the
        size-weighted sum of x is conserved up to that dtype's rounding.
        """
        compute_dtype = torch.promote_types(
            x.dtype, torch.promote_types(self.size.dtype, torch.float32)
        )
        trailing = (1,) * (x.ndim - 2)
        weights = self.input_size.to(compute_dtype).view(*self.input_size.shape, *trailing)
        total = self.merge(x.to(compute_dtype) * weights)
        return (total / self.size.to(compute_dtype).view(*self.size.shape, *trailing)).to(x.dtype)

    def unmerge(self, merged: torch.Tensor) -> torch.Tensor:
        """Give every input token its output token: (B, M, ...) -> (B, N, ...) (inverse of merge
        for tokens that were not merged)."""
        batch, tokens = self.destination.shape
        if tuple(merged.shape[:2]) != (batch, self.size.shape[1]):
            raise ValueError(
                f"merged must have shape (B, M, ...) with (B, M) = {(batch, self.size.shape[1])}, "
                f"got {describe(merged)}"
            )
        trailing = merged.shape[2:]
        index = self.destination.view(batch, tokens, *(1,) * len(trailing))
        return merged.gather(1, index.expand(batch, tokens, *trailing))


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    *,
    size: torch.Tensor | None = None,
    order: str = "ascending",
    protected: int = 0,
) -> TokenMerge:
    """Decide which tokens merge and in what order they come out (paper 001 Algorithm 1).

    metric: (B, N, Cm), e.g. the attention keys; size: (B, N) patches per token (default ones,
    float32). The first `protected` tokens never merge and stay first. The rest alternate into
    A (even offsets) and B (odd offsets); every A token picks its most cosine-similar B token
    and the r A tokens with the highest such similarity merge into their picks (r is capped at
    half the mergeable tokens). Ties go to the earlier token. Output order "none" is ToMe's:
    protected, unmerged A, then B, each in input order (the input order itself when r = 0);
    "ascending" / "descending" sort by merged size (ascending puts never-merged tokens first,
    the order paper 001 uses), equal sizes in the input order of their first token so that
    unmerged tokens keep their spatial order. Protected tokens stay first in every order.
    """
    check_tensor("metric", metric, 3, "(B, N, Cm)")
    check_positive_int("r", r, allow_zero=True)
    check_positive_int("protected", protected, allow_zero=True)
    batch, tokens, _ = metric.shape
    if protected > tokens:
        raise ValueError(
            f"protected must be <= the number of tokens N = {tokens} of metric "
            f"{describe(metric)}, got {protected}"
        )
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if size is None:
        size = torch.ones(batch, tokens, dtype=torch.float32, device=metric.device)
    else:
        check_tensor("size", size, 2, "(B, N)")
        check_shape("size", size, (batch, tokens), "(B, N)")

    r = min(r, (tokens - protected) // 2)
    device = metric.device

    if r == 0:
        # Nothing merges: keep the input order, as ToMe does (its A-then-B order needs a merge).
        destination = torch.arange(tokens, device=device).repeat(batch, 1)
    else:
        destination = _matched_destination(metric, r, protected)

    outputs = tokens - r
    merged_size = size.new_zeros(batch, outputs).scatter_add(1, destination, size)
    if order != "none":
        # Sort by size; equal sizes keep raster order (of each token's first patch), so a
        # recurrent LLM still sweeps the never-merged tokens of a frame in spatial order.
        first_position = torch.full_like(destination[:, :outputs], tokens).scatter_reduce(
            1, destination, torch.arange(tokens, device=device).expand(batch, -1), "amin"
        )
        raster = first_position[:, protected:].argsort(dim=-1)
        by_size = (
            merged_size[:, protected:]
            .detach()
            .gather(1, raster)
            .argsort(dim=-1, descending=order == "descending", stable=True)
        )
        head = torch.arange(protected, device=device).expand(batch, -1)
        permutation = torch.cat([head, raster.gather(1, by_size) + protected], dim=1)
        new_slot = torch.empty_like(permutation)  # permutation: new slot -> old slot
        new_slot.scatter_(1, permutation, torch.arange(outputs, device=device).expand(batch, -1))
        destination = new_slot.gather(1, destination)
        merged_size = merged_size.gather(1, permutation)
    return TokenMerge(destination=destination, input_size=size, size=merged_size)


def _matched_destination(metric: torch.Tensor, r: int, protected: int) -> torch.Tensor:
    """Output slot (B, N) of every token in ToMe's order (protected, kept A, B) for r >= 1."""
    batch, tokens, _ = metric.shape
    device = metric.device
    a_count, b_count = (tokens - protected + 1) // 2, (tokens - protected) // 2
    # Matching is a discrete choice: gradients reach x and size through the merge only.
    unit = F.normalize(metric[:, protected:].detach().float(), dim=-1)
    scores = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)  # (B, A, B)
    best_score, best_match = scores.max(dim=-1)  # (B, A); ties pick the earlier B token
    rank = best_score.argsort(dim=-1, descending=True, stable=True)
    merged_a, kept_a = rank[:, :r], rank[:, r:].sort(dim=-1).values

    b_start = protected + a_count - r
    a_destination = torch.empty(batch, a_count, dtype=torch.long, device=device)
    kept_slots = torch.arange(protected, b_start, device=device).expand_as(kept_a)
    a_destination.scatter_(1, kept_a, kept_slots)
    a_destination.scatter_(1, merged_a, b_start + best_match.gather(1, merged_a))
    destination = torch.empty(batch, tokens, dtype=torch.long, device=device)
    destination[:, :protected] = torch.arange(protected, device=device)
    destination[:, protected::2] = a_destination
    destination[:, protected + 1 :: 2] = torch.arange(b_start, b_start + b_count, device=device)
    return destination


def tome_merge(
    x: torch.Tensor,
    r: int,
    *,
    metric: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    order: str = "ascending",
    protected: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge r pairs of similar tokens by size-weighted average and sort by size (paper 001
    §3.1 and Algorithm 1; ToMe's bipartite soft matching).

    x: (B, N, C); metric: (B, N, Cm), default x; size: (B, N) patches per token, default ones.
    Returns x (B, N - r, C) in x's dtype and size (B, N - r); r is capped at half the tokens
    after the first `protected`. See `bipartite_soft_matching` for matching and `order`.
    """
    check_tensor("x", x, 3, "(B, N, C)")
    if metric is None:
        metric = x
    else:
        check_tensor("metric", metric, 3, "(B, N, Cm)")
        check_shape("metric", metric, (*x.shape[:2], metric.shape[2]), "(B, N, Cm)")
    merge = bipartite_soft_matching(metric, r, size=size, order=order, protected=protected)
    return merge.average(x), merge.size


def proportional_attention_bias(size: torch.Tensor) -> torch.Tensor:
    """Additive attention-logit bias log(size) for merged keys (paper 001 eq. 2, "+ log s").

    size: (B, N) patches per token -> (B, 1, 1, N), broadcasting over heads and queries of
    logits laid out (B, H, N_query, N).
    """
    check_tensor("size", size, 2, "(B, N)")
    return size.log()[:, None, None, :]
