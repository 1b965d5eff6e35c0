"""3D (shifted) window attention over a (T, H, W) token grid: the Local-Swin branch of LinMU's
M-MATE block (paper 003 §3.1.2, after Video Swin).

Tokens attend only within their window, so the cost is linear in the number of tokens. The fast
form rolls the grid by minus the shift and cuts it into at most 8 regions (full or partial
windows along each axis); within a region all windows have one shape, so each region is one
batched matmul with no padding and no mask. Conventions: DESIGN.md, "Math conventions",
3D window attention.
"""

from __future__ import annotations

import itertools
import math

import torch

from linvid.ops.validation import check_positive_int, check_shape, check_tensor, describe

GRID_DIMS = (1, 2, 3)  # the (T, H, W) axes of a (B, T, H, W, heads, dim) grid tensor


def window_attention_3d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    window: tuple[int, int, int],
    shift: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """Softmax attention restricted to the 3D windows of a cyclically shifted grid
    (paper 003 §3.1.2, Attn_win = softmax(Q K^T / sqrt(d_h)) V inside each window).

    q, k: (B, N, H, D); v: (B, N, H, Dv); tokens in raster order of grid = (T, Hg, Wg),
    N = T*Hg*Wg. Token (t, y, x) joins window (t'//wt, y'//wy, x'//wx) of its rolled
    coordinates t' = (t - st) mod T (likewise y', x'), for window = (wt, wy, wx) and
    shift = (st, sy, sx); windows at the far edges may be partial, and a window larger than the
    grid covers the whole axis. Returns (B, N, H, Dv) in raster order and q's dtype; logits and
    softmax are computed in float32 (float64 for float64 input).
    """
    grid, window, shift = _check_inputs(q, k, v, grid, window, shift)
    batch, tokens, heads, _ = q.shape
    window = tuple(min(size, extent) for size, extent in zip(window, grid, strict=True))
    compute_dtype = torch.promote_types(q.dtype, torch.float32)

    def to_rolled_grid(x: torch.Tensor) -> torch.Tensor:
        # (B, N, H, C) -> (B, T, Hg, Wg, H, C) with rolled coordinates, as torch.roll(-shift).
        x = x.to(compute_dtype).reshape(batch, *grid, heads, x.shape[-1])
        return x.roll([-offset for offset in shift], dims=GRID_DIMS)

    q_grid = to_rolled_grid(q) * q.shape[-1] ** -0.5
    k_grid = to_rolled_grid(k)
    v_grid = to_rolled_grid(v)
    output = v_grid.new_empty(batch, *grid, heads, v.shape[-1])
    for region, region_window in _regions(grid, window):
        index = (slice(None), *region)
        output[index] = _attend_within_windows(
            q_grid[index], k_grid[index], v_grid[index], region_window
        )
    output = output.roll(list(shift), dims=GRID_DIMS)
    return output.reshape(batch, tokens, heads, -1).to(q.dtype)


def window_attention_3d_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    window: tuple[int, int, int],
    shift: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """Dense reference for `window_attention_3d` (paper 003 §3.1.2): full N x N logits with every
    pair of tokens in different windows masked out. O(N^2) memory; for tests.

    Same arguments, shapes and result as `window_attention_3d`.
    """
    grid, window, shift = _check_inputs(q, k, v, grid, window, shift)
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    window_id = _window_ids(grid, window, shift, q.device)
    same_window = window_id[:, None] == window_id[None, :]
    logits = torch.einsum("bnhd,bmhd->bhnm", q.to(compute_dtype), k.to(compute_dtype))
    logits = (logits * q.shape[-1] ** -0.5).masked_fill(~same_window, float("-inf"))
    probabilities = logits.softmax(dim=-1)
    output = torch.einsum("bhnm,bmhd->bnhd", probabilities, v.to(compute_dtype))
    return output.to(q.dtype)


def _regions(grid: tuple[int, ...], window: tuple[int, ...]):
    """Yield (slices, window shape) for the up to 8 blocks of the rolled grid in which all
    windows have one shape: along each axis the full windows, then the partial remainder."""
    pieces_per_axis = []
    for extent, size in zip(grid, window, strict=True):
        full = extent // size * size
        pieces = [(slice(0, full), size)]
        if full < extent:
            pieces.append((slice(full, extent), extent - full))
        pieces_per_axis.append(pieces)
    for pieces in itertools.product(*pieces_per_axis):
        yield tuple(piece for piece, _ in pieces), tuple(size for _, size in pieces)


def _attend_within_windows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, int, int]
) -> torch.Tensor:
    """Attention inside each window of a block whose extents are multiples of `window`.

    q (pre-scaled), k: (B, a, b, c, H, D); v: (B, a, b, c, H, Dv) -> (B, a, b, c, H, Dv).
    """
    batch, *extents, heads, _ = q.shape
    counts = [extent // size for extent, size in zip(extents, window, strict=True)]
    split = [n for count_and_size in zip(counts, window, strict=True) for n in count_and_size]

    def partition(x: torch.Tensor) -> torch.Tensor:
        # (B, a, b, c, H, C) -> (B, a/wa, wa, b/wb, wb, c/wc, wc, H, C)
        #                    -> (B, H, windows, window volume, C)
        x = x.reshape(batch, *split, heads, x.shape[-1])
        return x.permute(0, 7, 1, 3, 5, 2, 4, 6, 8).reshape(
            batch, heads, math.prod(counts), math.prod(window), x.shape[-1]
        )

    probabilities = (partition(q) @ partition(k).transpose(-1, -2)).softmax(dim=-1)
    output = probabilities @ partition(v)
    output = output.reshape(batch, heads, *counts, *window, output.shape[-1])
    return output.permute(0, 2, 5, 3, 6, 4, 7, 1, 8).reshape(
        batch, *extents, heads, output.shape[-1]
    )


def _window_ids(grid, window, shift, device) -> torch.Tensor:
    """Window number of every token in raster order: (N,) long (paper 003 §3.1.2)."""
    windows_per_axis = [-(-extent // size) for extent, size in zip(grid, window, strict=True)]
    window_id = torch.zeros((), dtype=torch.long, device=device)
    for axis, (extent, size, offset) in enumerate(zip(grid, window, shift, strict=True)):
        rolled = (torch.arange(extent, device=device) - offset) % extent
        shape = [1, 1, 1]
        shape[axis] = extent
        window_id = window_id * windows_per_axis[axis] + (rolled // size).reshape(shape)
    return window_id.reshape(-1)


def _check_inputs(q, k, v, grid, window, shift):
    check_tensor("q", q, 4, "(B, N, H, D)")
    check_tensor("k", k, 4, "(B, N, H, D)")
    check_tensor("v", v, 4, "(B, N, H, Dv)")
    check_shape("k", k, q.shape, "(B, N, H, D)")
    check_shape("v", v, (*q.shape[:3], v.shape[-1]), "(B, N, H, Dv)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k and v must share one dtype, got q {describe(q)}, k {describe(k)}, "
            f"v {describe(v)}"
        )
    grid = _check_triple("grid", grid)
    window = _check_triple("window", window)
    shift = _check_triple("shift", shift, allow_zero=True)
    if math.prod(grid) != q.shape[1]:
        raise ValueError(
            f"grid {grid} has {math.prod(grid)} tokens but q has N = {q.shape[1]} tokens "
            f"(q {describe(q)}); expected T*H*W == N"
        )
    return grid, window, shift


def _check_triple(name: str, value, *, allow_zero: bool = False) -> tuple[int, int, int]:
    if not isinstance(value, tuple | list) or len(value) != 3:
        raise ValueError(f"{name} must be a tuple of 3 ints (t, y, x), got {value!r}")
    for axis, entry in enumerate(value):
        check_positive_int(f"{name}[{axis}]", entry, allow_zero=allow_zero)
    return tuple(value)
