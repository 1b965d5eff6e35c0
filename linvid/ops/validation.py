"""Input checks shared by the ops: each raises ValueError naming the argument, its shape and
what was expected, so a user sees which tensor was wrong rather than a broadcast error deep
inside a matmul."""

from __future__ import annotations

import torch


def describe(tensor: torch.Tensor) -> str:
    """Short 'shape (2, 5, 4) dtype float32' text for error messages."""
    return f"shape {tuple(tensor.shape)} dtype {str(tensor.dtype).removeprefix('torch.')}"


def check_tensor(name: str, tensor, ndim: int, layout: str) -> None:
    """Require `tensor` to be a floating-point tensor of `ndim` dimensions laid out as `layout`."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got {describe(tensor)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor {layout}, got {describe(tensor)}")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple, layout: str) -> None:
    """Require `tensor.shape == expected`; `layout` names the axes, e.g. '(B, T, H, K)'."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {layout} = {tuple(expected)}, got {describe(tensor)}"
        )


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> None:
    """Require an int > 0 (or >= 0 with allow_zero)."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
