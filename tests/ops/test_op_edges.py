"""Edges of the ops the mutation run (docs/mutation.md) found unchecked: the input checks name
the argument and show what they got (linvid/ops/validation.py's rule) for the scan of vision
tokens and ToMe's merge and unmerge, `tome_merge` protects no token unless asked, and the dense
window-attention reference computes half-precision inputs in float32 and returns their dtype."""

import re

import pytest
import torch

from linvid.ops.scan import rms_sequence_permutation, scan_vision_tokens, unscan_vision_tokens
from linvid.ops.tome import bipartite_soft_matching, tome_merge
from linvid.ops.window_attention import window_attention_3d_naive


def test_scan_and_unscan_name_their_argument_and_what_they_got():
    for function, name in ((scan_vision_tokens, "x"), (unscan_vision_tokens, "y")):
        for value, shown in (
            (torch.zeros(4), "shape (4,) dtype float32"),
            ([[0.0] * 4], "list"),
        ):
            message = re.escape(f"{name} must be a torch.Tensor (B, L, ...), got {shown}")
            with pytest.raises(ValueError, match=f"^{message}$"):
                function(value, [], 0)


def test_unmerge_names_the_expected_and_the_given_shape():
    merge = bipartite_soft_matching(torch.randn(2, 6, 4), 2)  # 6 tokens -> 4
    assert merge.unmerge(torch.zeros(2, 4, 3)).shape == (2, 6, 3)
    message = re.escape(
        "merged must have shape (B, M, ...) with (B, M) = (2, 4), got shape (2, 5, 3) dtype float32"
    )
    with pytest.raises(ValueError, match=f"^{message}$"):
        merge.unmerge(torch.zeros(2, 5, 3))


def test_tome_merge_names_a_wrong_metric():
    x = torch.zeros(1, 4, 3)
    message = re.escape("metric must have 3 dimensions (B, N, Cm), got shape (4, 3) dtype float32")
    with pytest.raises(ValueError, match=f"^{message}$"):
        tome_merge(x, 1, metric=torch.zeros(4, 3))


def test_tome_merge_protects_no_token_by_default():
    """With nothing protected, 4 tokens split into 2 A and 2 B tokens, so r = 2 merges both A
    tokens (paper 001 Algorithm 1); one protected token would cap r at 1."""
    x = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0))
    merged, size = tome_merge(x, 2)
    assert merged.shape == (1, 2, 3) and size.sum().item() == 4.0
    assert tome_merge(x, 2, protected=1)[0].shape == (1, 3, 3)


def test_scan_permutation_names_a_bad_length_or_layer():
    for arguments, message in (
        ((0, [], 0), "length must be an int >= 1, got 0"),
        ((4, [], -1), "layer_idx must be an int >= 0, got -1"),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            rms_sequence_permutation(*arguments)


def test_the_dense_window_reference_keeps_half_precision_inputs_in_their_dtype():
    """bfloat16 q, k, v: computed in float32 (as the float64 reference here, within bfloat16's
    rounding of the output) and returned in bfloat16 (paper 003 §3.1.2 windows)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=generator) for _ in range(3))
    grid, window = (2, 2, 2), (1, 2, 2)
    expected = window_attention_3d_naive(q.double(), k.double(), v.double(), grid, window)
    half = [tensor.bfloat16() for tensor in (q, k, v)]
    output = window_attention_3d_naive(*half, grid, window)
    assert output.dtype == torch.bfloat16
    exact = window_attention_3d_naive(*(t.double() for t in half), grid, window)
    torch.testing.assert_close(output.double(), exact.bfloat16().double(), rtol=0, atol=0)
    torch.testing.assert_close(output.double(), expected, rtol=0.02, atol=0.02)
