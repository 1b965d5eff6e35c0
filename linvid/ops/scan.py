"""Rotary Major Scan (RMS): the per-layer order in which LinMU's Flex-MA branch scans the vision
tokens of a (T, H, W) grid (paper 003 §3.1.1, from LinGen), built from reshapes only.

Layer l visits the grid with one of four axis orders, slowest to fastest varying:
(t, y, x), (t, x, y), (y, x, t), (x, y, t) for l % 4 = 0, 1, 2, 3. For an image (T = 1) the
last two coincide with the first two. RMS only changes the order of vision tokens: in a mixed
text/vision sequence the vision slots are refilled in scan order and text tokens stay put, so a
vision mask is the same before and after the scan. Conventions: DESIGN.md, "Math conventions",
Rotary Major Scan.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from linvid.ops.validation import check_positive_int, describe

# Grid axes (0 = t, 1 = y, 2 = x) from slowest to fastest varying in the scan of layer l,
# indexed by l % 4: the four cases of n_l in paper 003 §3.1.1.
SCAN_AXES = ((0, 1, 2), (0, 2, 1), (1, 2, 0), (2, 1, 0))


def rms_positions(T: int, H: int, W: int, layer_idx: int) -> torch.Tensor:
    """Scan position n_l of every grid token (paper 003 §3.1.1, the n_l formula).

    Returns a LongTensor (T*H*W,) whose entry [t*H*W + y*W + x] is the position of token
    (t, y, x) in layer `layer_idx`'s scan:
    l%4 == 0: t*H*W + y*W + x;  1: t*H*W + x*H + y;  2: y*T*W + x*T + t;  3: x*T*H + y*T + t.
    """
    _check_grid_and_layer(T, H, W, layer_idx)
    sizes = (T, H, W)
    axes = SCAN_AXES[layer_idx % 4]
    # Counting 0, 1, 2, ... over a tensor laid out in scan axis order gives each token its scan
    # position; permuting back to (t, y, x) and flattening lists them in raster order.
    scan = torch.arange(T * H * W).reshape([sizes[axis] for axis in axes])
    return scan.permute([axes.index(axis) for axis in range(3)]).reshape(-1)


def rms_permutation(T: int, H: int, W: int, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pair that puts raster-ordered grid tokens into scan order and back (paper 003 §3.1.1).

    Returns (order, inverse), LongTensors (T*H*W,): for x (B, T*H*W, ...) in raster order,
    `x[:, order]` is in layer `layer_idx`'s scan order and `x[:, order][:, inverse]` is x.
    `order[n]` is the raster index of the token scanned n-th; `inverse` equals
    `rms_positions(T, H, W, layer_idx)`.
    """
    _check_grid_and_layer(T, H, W, layer_idx)
    axes = SCAN_AXES[layer_idx % 4]
    order = torch.arange(T * H * W).reshape(T, H, W).permute(axes).reshape(-1)
    return order, rms_positions(T, H, W, layer_idx)


def rms_sequence_permutation(
    length: int,
    videos: Sequence[tuple[torch.Tensor, tuple[int, int, int]]],
    layer_idx: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pair that scans the vision tokens of a mixed sequence and leaves text in place
    (paper 003 §3.1.1: "RMS only changes the order of vision tokens").

    length: L, the sequence length. videos: one (positions, grid) pair per video or image, where
    grid = (T, H, W) and positions is a LongTensor (T*H*W,) holding the sequence positions of
    that grid's tokens in raster order, strictly increasing; different videos use disjoint
    positions. Each video's slots are refilled in its own scan order: its token of scan
    position n moves to its n-th slot.
    Returns (order, inverse), LongTensors (L,) on the positions' device (CPU if no videos):
    `x[:, order]` is scanned, `x[:, order][:, inverse]` is x, and both are the identity at
    text positions. Build them once per layer and index every tensor that needs scanning.
    """
    check_positive_int("length", length)
    check_positive_int("layer_idx", layer_idx, allow_zero=True)
    device = videos[0][0].device if len(videos) > 0 else torch.device("cpu")
    order = torch.arange(length, device=device)
    inverse = torch.arange(length, device=device)
    for index, (positions, grid) in enumerate(videos):
        _check_video_positions(f"videos[{index}]", positions, grid, length)
    if len(videos) > 1:
        taken = torch.cat([positions for positions, _ in videos])
        if taken.unique().numel() != taken.numel():
            raise ValueError(
                f"videos must use disjoint sequence positions, got {taken.numel()} vision "
                f"positions of which only {taken.unique().numel()} are distinct"
            )
    for positions, grid in videos:
        video_order, video_inverse = rms_permutation(*grid, layer_idx)
        order[positions] = positions[video_order.to(device)]
        inverse[positions] = positions[video_inverse.to(device)]
    return order, inverse


def scan_vision_tokens(
    x: torch.Tensor,
    videos: Sequence[tuple[torch.Tensor, tuple[int, int, int]]],
    layer_idx: int,
) -> torch.Tensor:
    """Reorder the vision tokens of a sequence into layer `layer_idx`'s scan order, text tokens
    untouched (paper 003 §3.1.1, Algorithm 1 line 2 "RMS").

    x: (B, L, ...) of any dtype; videos: as in `rms_sequence_permutation`. Returns (B, L, ...).
    """
    _check_sequence("x", x)
    order, _ = rms_sequence_permutation(x.shape[1], videos, layer_idx)
    return x[:, order.to(x.device)]


def unscan_vision_tokens(
    y: torch.Tensor,
    videos: Sequence[tuple[torch.Tensor, tuple[int, int, int]]],
    layer_idx: int,
) -> torch.Tensor:
    """Undo `scan_vision_tokens`: vision tokens back to raster order, text tokens untouched
    (paper 003 §3.1.1, Algorithm 1 line 4 "Rev-RMS").

    y: (B, L, ...) in scan order; videos: as in `rms_sequence_permutation`. Returns (B, L, ...).
    """
    _check_sequence("y", y)
    _, inverse = rms_sequence_permutation(y.shape[1], videos, layer_idx)
    return y[:, inverse.to(y.device)]


def _check_grid_and_layer(T: int, H: int, W: int, layer_idx: int) -> None:
    check_positive_int("T", T)
    check_positive_int("H", H)
    check_positive_int("W", W)
    check_positive_int("layer_idx", layer_idx, allow_zero=True)


def _check_sequence(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        shown = describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a torch.Tensor (B, L, ...), got {shown}")


def _check_video_positions(name: str, positions, grid, length: int) -> None:
    if not isinstance(grid, Sequence) or len(grid) != 3:
        raise ValueError(f"{name} grid must be a sequence (T, H, W) of 3 ints, got {grid!r}")
    for axis, size in enumerate(grid):
        check_positive_int(f"{name} grid[{axis}]", size)
    expected = grid[0] * grid[1] * grid[2]
    if (
        not isinstance(positions, torch.Tensor)
        or positions.dtype != torch.long
        or tuple(positions.shape) != (expected,)
    ):
        shown = (
            describe(positions) if isinstance(positions, torch.Tensor) else type(positions).__name__
        )
        raise ValueError(
            f"{name} positions must be a LongTensor (T*H*W,) = ({expected},) for grid "
            f"{tuple(grid)}, got {shown}"
        )
    if positions.min() < 0 or positions.max() >= length:
        raise ValueError(
            f"{name} positions must lie in [0, {length}) (the sequence length), got values "
            f"from {positions.min().item()} to {positions.max().item()}"
        )
    if not bool((positions[1:] > positions[:-1]).all()):
        raise ValueError(
            f"{name} positions must be strictly increasing (raster order of the grid along "
            f"the sequence), got {positions.tolist()[:8]}{'...' if expected > 8 else ''}"
        )
