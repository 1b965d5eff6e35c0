"""3D shifted window attention (paper 003 §3.1.2) against dense attention masked by window ids
that are computed here token by token from the definition."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from linvid.ops.window_attention import window_attention_3d, window_attention_3d_naive

SETTINGS = settings(max_examples=40, deadline=None)


def dense_reference(q, k, v, grid, window, shift):
    """softmax(q.k / sqrt(D)) over all token pairs that share a window of the rolled grid."""
    T, H, W = grid
    window_of = []
    for t in range(T):
        for y in range(H):
            for x in range(W):
                rolled = ((t - shift[0]) % T, (y - shift[1]) % H, (x - shift[2]) % W)
                window_of.append(tuple(c // size for c, size in zip(rolled, window, strict=True)))
    same = torch.tensor([[a == b for b in window_of] for a in window_of])
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    probabilities = logits.masked_fill(~same, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", probabilities, v)


@st.composite
def problems(draw):
    """Random grid, window (partial windows and windows larger than the grid included), shift."""
    grid = draw(st.tuples(*[st.integers(1, 6)] * 3).filter(lambda g: math.prod(g) <= 150))
    window = draw(st.tuples(*[st.integers(1, 7)] * 3))
    shift = draw(st.one_of(st.just((0, 0, 0)), st.tuples(*[st.integers(0, 8)] * 3)))
    batch, heads, dim, value_dim = draw(
        st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))
    )
    seed = draw(st.integers(0, 2**31 - 1))
    return grid, window, shift, batch, heads, dim, value_dim, seed


def random_qkv(batch, tokens, heads, dim, value_dim, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, heads, dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, tokens, heads, dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, tokens, heads, value_dim, generator=generator, dtype=dtype)
    return q, k, v


@SETTINGS
@given(problem=problems())
def test_matches_dense_reference(problem):
    grid, window, shift, batch, heads, dim, value_dim, seed = problem
    q, k, v = random_qkv(batch, math.prod(grid), heads, dim, value_dim, seed)
    expected = dense_reference(q, k, v, grid, window, shift)
    output = window_attention_3d(q, k, v, grid, window, shift)
    assert output.shape == (batch, math.prod(grid), heads, value_dim)
    assert output.dtype == torch.float64
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(window_attention_3d_naive(q, k, v, grid, window, shift), expected)


@SETTINGS
@given(problem=problems())
def test_gradients_match_dense_reference(problem):
    grid, window, shift, batch, heads, dim, value_dim, seed = problem
    inputs = random_qkv(batch, math.prod(grid), heads, dim, value_dim, seed)
    weight = torch.randn(batch, math.prod(grid), heads, value_dim, dtype=torch.float64)

    def gradients(attention):
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        (attention(*leaves, grid, window, shift) * weight).sum().backward()
        return [leaf.grad for leaf in leaves]

    for got, expected in zip(
        gradients(window_attention_3d), gradients(dense_reference), strict=True
    ):
        torch.testing.assert_close(got, expected)


def test_window_larger_than_grid_is_full_attention():
    q, k, v = random_qkv(1, 2 * 3 * 4, 2, 4, 3, seed=0)
    full = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    for shift in [(0, 0, 0), (1, 2, 3)]:
        output = window_attention_3d(q, k, v, (2, 3, 4), (16, 4, 4), shift)
        torch.testing.assert_close(output, full)


def test_shift_changes_windows_and_is_cyclic():
    grid, window = (2, 4, 6), (2, 2, 2)
    q, k, v = random_qkv(1, math.prod(grid), 2, 4, 3, seed=1)
    unshifted = window_attention_3d(q, k, v, grid, window)
    shifted = window_attention_3d(q, k, v, grid, window, (1, 1, 1))
    assert not torch.allclose(shifted, unshifted)
    # a shift by whole windows along axes the windows tile, or by whole grid periods, is no shift
    for same_partition in [(2, 2, 4), (0, 4, 6), (4, 8, 12)]:
        torch.testing.assert_close(
            window_attention_3d(q, k, v, grid, window, same_partition), unshifted
        )


def test_tokens_attend_only_within_their_window():
    # (1, 1, 5) row, windows of 2 shifted by 1: rolled x' = x - 1 mod 5 gives windows
    # {x=1,2}, {x=3,4}, {x=0} (the partial window at the far edge, wrapped to the front)
    q, k, v = random_qkv(1, 5, 1, 2, 1, seed=2)
    v = torch.arange(5, dtype=torch.float64).reshape(1, 5, 1, 1)
    output = window_attention_3d(q, k, v, (1, 1, 5), (1, 1, 2), (0, 0, 1)).flatten()
    assert output[0] == 0
    assert all(1 <= value <= 2 for value in output[1:3])
    assert all(3 <= value <= 4 for value in output[3:5])


@SETTINGS
@given(problem=problems())
def test_bfloat16_close_to_float32(problem):
    grid, window, shift, batch, heads, dim, value_dim, seed = problem
    q, k, v = random_qkv(batch, math.prod(grid), heads, dim, value_dim, seed, torch.bfloat16)
    output = window_attention_3d(q, k, v, grid, window, shift)
    assert output.dtype == torch.bfloat16
    expected = dense_reference(q.float(), k.float(), v.float(), grid, window, shift)
    torch.testing.assert_close(output.float(), expected, atol=2e-2, rtol=2e-2)


def test_cost_is_linear_in_tokens():
    # doubling the number of frames doubles the matmul work; dense attention would quadruple it
    def flops(frames):
        q, k, v = random_qkv(1, frames * 8 * 8, 2, 8, 8, seed=3, dtype=torch.float32)
        with FlopCounterMode(display=False) as counter:
            window_attention_3d(q, k, v, (frames, 8, 8), (4, 4, 4), (2, 2, 2))
        return counter.get_total_flops()

    assert flops(16) == 2 * flops(8) > 0


GRID = (2, 3, 4)


def qkv(tokens=24, dim=4, value_dim=3, dtype=torch.float32):
    return (
        torch.zeros(1, tokens, 2, dim, dtype=dtype),
        torch.zeros(1, tokens, 2, dim, dtype=dtype),
        torch.zeros(1, tokens, 2, value_dim, dtype=dtype),
    )


@pytest.mark.parametrize("attention", [window_attention_3d, window_attention_3d_naive])
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((*qkv(tokens=25), GRID, (1, 1, 1)), r"grid \(2, 3, 4\) has 24 tokens but q has N = 25"),
        ((*qkv(), GRID, (1, 0, 1)), r"window\[1\] must be an int >= 1, got 0"),
        ((*qkv(), GRID, (1, 2.5, 1)), r"window\[1\] must be an int >= 1, got 2.5"),
        ((*qkv(), GRID, (2, 2)), r"window must be a tuple of 3 ints \(t, y, x\), got \(2, 2\)"),
        ((*qkv(), GRID, (2, 2, 2), (0, -1, 0)), r"shift\[1\] must be an int >= 0, got -1"),
        ((*qkv(), (2, 3, 0), (2, 2, 2)), r"grid\[2\] must be an int >= 1, got 0"),
        (
            (qkv()[0], torch.zeros(1, 24, 2, 5), qkv()[2], GRID, (2, 2, 2)),
            r"k must have shape \(B, N, H, D\) = \(1, 24, 2, 4\), got shape \(1, 24, 2, 5\)",
        ),
        (
            (*qkv()[:2], torch.zeros(1, 23, 2, 3), GRID, (2, 2, 2)),
            r"v must have shape \(B, N, H, Dv\) = \(1, 24, 2, 3\), got shape \(1, 23, 2, 3\)",
        ),
        (
            (torch.zeros(24, 2, 4), *qkv()[1:], GRID, (2, 2, 2)),
            r"q must have 4 dimensions \(B, N, H, D\), got shape \(24, 2, 4\)",
        ),
        (
            (*qkv()[:2], qkv(dtype=torch.float64)[2], GRID, (2, 2, 2)),
            "q, k and v must share one dtype",
        ),
    ],
)
def test_errors_name_the_argument(attention, arguments, message):
    with pytest.raises(ValueError, match=message):
        attention(*arguments)
