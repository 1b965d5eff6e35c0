"""Rotary Major Scan (paper 003 §3.1.1) against the n_l formula written out with loops."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linvid.ops.scan import (
    rms_permutation,
    rms_positions,
    rms_sequence_permutation,
    scan_vision_tokens,
    unscan_vision_tokens,
)

SETTINGS = settings(max_examples=40, deadline=None)
sizes = st.integers(1, 6)
layers = st.integers(0, 11)


def formula_positions(T, H, W, layer_idx):
    """n_l of paper 003 §3.1.1, one token at a time, listed in raster order."""
    positions = []
    for t in range(T):
        for y in range(H):
            for x in range(W):
                positions.append(
                    [
                        t * H * W + y * W + x,
                        t * H * W + x * H + y,
                        y * T * W + x * T + t,
                        x * T * H + y * T + t,
                    ][layer_idx % 4]
                )
    return torch.tensor(positions)


@SETTINGS
@given(T=sizes, H=sizes, W=sizes, layer_idx=layers)
def test_positions_match_the_paper_formula_and_are_a_permutation(T, H, W, layer_idx):
    positions = rms_positions(T, H, W, layer_idx)
    assert positions.dtype == torch.long
    assert torch.equal(positions, formula_positions(T, H, W, layer_idx))
    assert torch.equal(positions.sort().values, torch.arange(T * H * W))


def test_four_patterns_on_a_small_grid():
    # token (t, y, x) of a (2, 2, 3) grid, raster order; each line is one layer_idx % 4
    expected = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
        [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11],
        [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11],
        [0, 4, 8, 2, 6, 10, 1, 5, 9, 3, 7, 11],
    ]
    for layer_idx in range(8):
        assert rms_positions(2, 2, 3, layer_idx).tolist() == expected[layer_idx % 4]


@SETTINGS
@given(H=st.integers(2, 6), W=st.integers(2, 6), layer_idx=layers)
def test_images_reduce_to_two_patterns(H, W, layer_idx):
    patterns = {tuple(rms_positions(1, H, W, layer).tolist()) for layer in range(4)}
    assert len(patterns) == 2
    assert torch.equal(rms_positions(1, H, W, layer_idx), rms_positions(1, H, W, layer_idx % 2))


@SETTINGS
@given(T=sizes, H=sizes, W=sizes, layer_idx=layers)
def test_permutation_scans_and_unscans(T, H, W, layer_idx):
    order, inverse = rms_permutation(T, H, W, layer_idx)
    positions = rms_positions(T, H, W, layer_idx)
    x = torch.randn(2, T * H * W, 3)
    scanned = x[:, order]
    assert torch.equal(scanned[:, positions], x)  # token i sits at its scan position n_l(i)
    assert torch.equal(scanned[:, inverse], x)
    assert torch.equal(inverse, positions)


@st.composite
def sequences(draw):
    """A sequence length and 0-3 videos whose (possibly interleaved) vision slots are disjoint."""
    grids = draw(
        st.lists(
            st.tuples(sizes, sizes, sizes).filter(lambda g: g[0] * g[1] * g[2] <= 40), max_size=3
        )
    )
    vision = sum(T * H * W for T, H, W in grids)
    length = vision + draw(st.integers(1 if vision == 0 else 0, 10))
    slots = draw(st.permutations(range(length)))
    videos, start = [], 0
    for grid in grids:
        volume = grid[0] * grid[1] * grid[2]
        videos.append((torch.tensor(sorted(slots[start : start + volume])), grid))
        start += volume
    return length, videos


@SETTINGS
@given(sequence=sequences(), layer_idx=layers)
def test_sequence_scan_moves_only_vision_tokens(sequence, layer_idx):
    length, videos = sequence
    x = torch.randn(2, length, 2, 3)
    scanned = scan_vision_tokens(x, videos, layer_idx)
    assert torch.equal(unscan_vision_tokens(scanned, videos, layer_idx), x)

    text = torch.ones(length, dtype=torch.bool)
    for positions, grid in videos:
        text[positions] = False
        # raster token i of this video moves to the video's n_l(i)-th slot
        slot = positions[rms_positions(*grid, layer_idx)]
        assert torch.equal(scanned[:, slot], x[:, positions])
    assert torch.equal(scanned[:, text], x[:, text])

    order, inverse = rms_sequence_permutation(length, videos, layer_idx)
    assert torch.equal(x[:, order], scanned)
    assert torch.equal(order[inverse], torch.arange(length))


def test_sequence_scan_of_one_video_between_text():
    # text, a (1, 2, 2) image at positions 1..4, text; layer 1 scans columns first
    x = torch.arange(6).reshape(1, 6)
    videos = [(torch.arange(1, 5), (1, 2, 2))]
    assert scan_vision_tokens(x, videos, 1).tolist() == [[0, 1, 3, 2, 4, 5]]
    assert scan_vision_tokens(x, videos, 0).tolist() == x.tolist()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rms_positions(0, 2, 2, 0), "T must be an int >= 1, got 0"),
        (lambda: rms_positions(1, 2, 2, -1), "layer_idx must be an int >= 0, got -1"),
        (lambda: rms_permutation(1, 2.0, 2, 0), "H must be an int >= 1, got 2.0"),
        (
            lambda: rms_sequence_permutation(6, [(torch.arange(3), (1, 2, 2))], 0),
            r"videos\[0\] positions must be a LongTensor \(T\*H\*W,\) = \(4,\)",
        ),
        (
            lambda: rms_sequence_permutation(6, [(torch.tensor([1, 3, 2, 4]), (1, 2, 2))], 0),
            r"videos\[0\] positions must be strictly increasing",
        ),
        (
            lambda: rms_sequence_permutation(4, [(torch.arange(1, 5), (1, 2, 2))], 0),
            r"videos\[0\] positions must lie in \[0, 4\)",
        ),
        (
            lambda: rms_sequence_permutation(4, [(torch.arange(2), (1, 2))], 0),
            r"videos\[0\] grid must be a sequence \(T, H, W\) of 3 ints",
        ),
        (
            lambda: rms_sequence_permutation(
                6, [(torch.arange(4), (1, 2, 2)), (torch.arange(3, 5), (1, 1, 2))], 0
            ),
            "videos must use disjoint sequence positions",
        ),
        (
            lambda: scan_vision_tokens(torch.zeros(5), [], 0),
            r"x must be a torch.Tensor \(B, L, ...\), got shape \(5,\)",
        ),
    ],
)
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
