"""Token merging (paper 001 §3.1, Algorithm 1) against a per-sample loop restatement, plus the
properties every merge must keep: token counts, conserved sizes and size-weighted sums,
protected tokens, orderings, gradients and proportional attention."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linvid.ops.tome import (
    ORDERS,
    bipartite_soft_matching,
    proportional_attention_bias,
    tome_merge,
)

fast = settings(max_examples=40, deadline=None)


@st.composite
def merge_cases(draw):
    """Random (x, r, metric, size, order, protected) with continuous features, so no ties."""
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 20))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(
        batch, tokens, draw(st.integers(1, 6)), generator=generator, dtype=torch.float64
    )
    metric_channels = draw(st.none() | st.integers(2, 6))
    metric = (
        None
        if metric_channels is None
        else torch.randn(batch, tokens, metric_channels, generator=generator)
    )
    size = (
        torch.randint(1, 6, (batch, tokens), generator=generator).double()
        if draw(st.booleans())
        else None
    )
    return {
        "x": x,
        "r": draw(st.integers(0, tokens)),
        "metric": metric,
        "size": size,
        "order": draw(st.sampled_from(ORDERS)),
        "protected": draw(st.integers(0, tokens)),
    }


def expected_count(tokens, r, protected):
    return tokens - min(r, (tokens - protected) // 2)


def loop_tome(x, r, metric, size, order, protected):
    """ToMe one sample at a time with Python lists: split, match, merge, concatenate, sort."""
    metric = x if metric is None else metric
    size = torch.ones(x.shape[:2], dtype=torch.float64) if size is None else size
    merged_x, merged_size = [], []
    for sample in range(x.shape[0]):
        mergeable = list(range(protected, x.shape[1]))
        set_a, set_b = mergeable[0::2], mergeable[1::2]
        pairs = min(r, len(mergeable) // 2)
        vectors = metric[sample].double()
        if pairs == 0:
            groups = [[i] for i in range(x.shape[1])]  # ToMe leaves the tokens alone
        else:
            best = {}
            for i in set_a:
                scores = [
                    float(vectors[i] @ vectors[j] / (vectors[i].norm() * vectors[j].norm()))
                    for j in set_b
                ]
                best[i] = max(zip(scores, set_b, strict=True), key=lambda pair: pair[0])
            merging = sorted(set_a, key=lambda i: -best[i][0])[:pairs]
            groups = (
                [[i] for i in range(protected)]
                + [[i] for i in set_a if i not in merging]
                + [[j] + [i for i in merging if best[i][1] == j] for j in set_b]
            )
        tokens = [
            (
                sum(x[sample, i] * size[sample, i] for i in group) / sum(size[sample, group]),
                sum(size[sample, group]),
                min(group),
            )
            for group in groups
        ]
        head, tail = tokens[:protected], tokens[protected:]
        # Sorted by size; equal sizes in the order of each group's first input token.
        if order == "ascending":
            tail = sorted(tail, key=lambda token: (float(token[1]), token[2]))
        elif order == "descending":
            tail = sorted(tail, key=lambda token: (-float(token[1]), token[2]))
        merged_x.append(torch.stack([token[0] for token in head + tail]))
        merged_size.append(torch.stack([token[1] for token in head + tail]))
    return torch.stack(merged_x), torch.stack(merged_size)


@fast
@given(merge_cases())
def test_matches_loop_reference(case):
    merged, size = tome_merge(**case)
    expected_merged, expected_size = loop_tome(**case)
    torch.testing.assert_close(size, expected_size.to(size.dtype))
    torch.testing.assert_close(merged, expected_merged)


@fast
@given(merge_cases())
def test_counts_and_conservation(case):
    x, protected = case["x"], case["protected"]
    merged, size = tome_merge(**case)
    count = expected_count(x.shape[1], case["r"], protected)
    assert merged.shape == (x.shape[0], count, x.shape[2])
    assert size.shape == (x.shape[0], count)
    input_size = torch.ones(x.shape[:2]) if case["size"] is None else case["size"]
    torch.testing.assert_close(size.sum(1), input_size.sum(1).to(size.dtype))
    torch.testing.assert_close(
        (merged * size[..., None]).sum(1), (x * input_size[..., None]).sum(1).to(x.dtype)
    )
    # Protected tokens never merge and stay first, untouched.
    torch.testing.assert_close(merged[:, :protected], x[:, :protected])
    torch.testing.assert_close(size[:, :protected], input_size[:, :protected].to(size.dtype))


@fast
@given(merge_cases())
def test_orders_sort_the_same_tokens(case):
    protected = case["protected"]
    results = {order: tome_merge(**{**case, "order": order}) for order in ORDERS}
    ascending = results["ascending"][1][:, protected:]
    descending = results["descending"][1][:, protected:]
    assert (ascending.diff(dim=1) >= 0).all()
    assert (descending.diff(dim=1) <= 0).all()
    # Every order holds the same (token, size) rows, only permuted.
    for merged, size in results.values():
        rows = torch.cat([merged, size[..., None].to(merged.dtype)], dim=-1)
        reference = torch.cat([results["none"][0], results["none"][1][..., None]], dim=-1)
        for sample in range(rows.shape[0]):
            torch.testing.assert_close(
                rows[sample].sort(dim=0).values, reference[sample].sort(dim=0).values
            )


def orthonormal_tokens(tokens, channels, seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
    return basis[:tokens].clone()


@pytest.mark.parametrize("protected", [0, 1, 2])
def test_most_similar_pairs_merge(protected):
    # Orthonormal tokens have cosine similarity 0 with each other, so the only positive
    # matches are the planted duplicates: A token (offset 2k) copies B token (offset 2k + 3).
    x = orthonormal_tokens(protected + 12, 16)[None]
    duplicated_pairs = [(0, 3), (4, 7), (6, 9)]
    for a_offset, b_offset in duplicated_pairs:
        x[0, protected + a_offset] = x[0, protected + b_offset]
    merged, size = tome_merge(x, len(duplicated_pairs), protected=protected, order="descending")
    assert size[0].tolist() == [1.0] * protected + [2.0] * 3 + [1.0] * (12 - 2 * 3)
    merged_rows = merged[0, protected : protected + 3]
    torch.testing.assert_close(merged_rows, x[0, [protected + b for _, b in duplicated_pairs]])
    assert merged.shape[1] == protected + 12 - len(duplicated_pairs)


def test_ties_merge_the_earlier_tokens():
    # All A tokens equal all B tokens: every score ties, so A tokens 0 and 2 merge into B 1.
    x = torch.ones(1, 8, 4)
    merge = bipartite_soft_matching(x, 2, order="none")
    assert merge.destination[0].tolist() == [2, 2, 2, 3, 0, 4, 1, 5]
    assert merge.size[0].tolist() == [1.0, 1.0, 3.0, 1.0, 1.0, 1.0]


def test_ascending_puts_unmerged_tokens_first_in_raster_order():
    x = orthonormal_tokens(8, 8)[None]
    x[0, 4] = x[0, 1]  # A token at 4 merges into B token at 1
    merge = bipartite_soft_matching(x, 1, order="ascending")
    # Unmerged tokens 0, 2, 3, 5, 6, 7 keep their input order; the size-2 token moves last.
    assert merge.destination[0].tolist() == [0, 6, 1, 2, 6, 3, 4, 5]
    assert merge.size[0].tolist() == [1.0] * 6 + [2.0]


@pytest.mark.parametrize("order", ORDERS)
def test_r_zero_returns_input(order):
    x = torch.randn(2, 7, 3)
    merged, size = tome_merge(x, 0, order=order)
    torch.testing.assert_close(merged, x)
    torch.testing.assert_close(size, torch.ones(2, 7))


def test_r_zero_still_orders_by_size():
    x = torch.randn(1, 5, 3)
    size = torch.tensor([[3.0, 1.0, 2.0, 1.0, 5.0]])
    merged, merged_size = tome_merge(x, 0, size=size, order="ascending", protected=1)
    assert merged_size[0].tolist() == [3.0, 1.0, 1.0, 2.0, 5.0]
    torch.testing.assert_close(merged[0], x[0, [0, 1, 3, 2, 4]])


@pytest.mark.parametrize(("tokens", "protected"), [(9, 0), (9, 2), (1, 0), (3, 3)])
def test_r_is_capped_at_half_the_mergeable_tokens(tokens, protected):
    merged, size = tome_merge(torch.randn(2, tokens, 4), 100, protected=protected)
    assert merged.shape[1] == tokens - (tokens - protected) // 2
    assert size.sum(1).tolist() == [float(tokens)] * 2


def test_bfloat16_input():
    x = torch.randn(2, 16, 8).to(torch.bfloat16)
    merged, size = tome_merge(x, 5, protected=1)
    reference, reference_size = tome_merge(x.float(), 5, protected=1)
    assert merged.dtype == torch.bfloat16
    assert size.dtype == torch.float32
    torch.testing.assert_close(size, reference_size)
    torch.testing.assert_close(merged.float(), reference, atol=1e-2, rtol=1e-2)


def test_gradients_flow_to_x_and_size():
    x = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (2, 10)).double().requires_grad_()
    merge = bipartite_soft_matching(x, 3, size=size)
    merged = merge.average(x)
    merged.sum().backward()
    # d/dx_i of sum(mean_j) is size_i / size_j for the output j that token i joined.
    expected = (size / merge.unmerge(merge.size[..., None])[..., 0]).detach()
    torch.testing.assert_close(x.grad, expected[..., None].expand_as(x))
    assert size.grad is not None and torch.isfinite(size.grad).all()


def test_plan_replays_on_other_tensors():
    x = torch.randn(2, 12, 4)
    positions = torch.arange(12).expand(2, 12)
    merge = bipartite_soft_matching(x, 4, protected=1, order="ascending")
    merged, size = tome_merge(x, 4, protected=1, order="ascending")
    torch.testing.assert_close(merge.average(x), merged)
    torch.testing.assert_close(merge.size, size)
    first_position = merge.merge(positions, reduce="amin")
    assert first_position.dtype == torch.long and first_position[:, 0].tolist() == [0, 0]
    # Unmerged tokens come back exactly; merged ones read their merged token.
    restored = merge.unmerge(merge.merge(positions, reduce="amin"))
    unmerged = merge.unmerge(merge.size[..., None])[..., 0] == 1
    assert torch.equal(restored[unmerged], positions[unmerged])
    assert (restored <= positions).all()


def test_proportional_bias_is_log_size_and_matches_duplicated_keys():
    size = torch.tensor([[1.0, 2.0, 3.0], [4.0, 1.0, 1.0]])
    bias = proportional_attention_bias(size)
    assert bias.shape == (2, 1, 1, 3)
    torch.testing.assert_close(bias[:, 0, 0], size.log())
    assert bias[0, 0, 0, 0].item() == 0.0 == math.log(1.0)
    # Attention to a key that stands for s identical keys equals attention to the s copies.
    keys = orthonormal_tokens(4, 8)[None]
    values = torch.randn(1, 4, 8)
    query = torch.randn(1, 1, 8)
    copies = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    full = torch.softmax(query @ keys[:, copies].mT, dim=-1) @ values[:, copies]
    counts = torch.tensor([[2.0, 1.0, 3.0, 1.0]])
    merged_logits = (query @ keys.mT)[:, None] + proportional_attention_bias(counts)
    proportional = torch.softmax(merged_logits, dim=-1)[:, 0] @ values
    torch.testing.assert_close(proportional, full)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"x": torch.randn(4, 3), "r": 1},
            r"x must have 3 dimensions \(B, N, C\), got shape \(4, 3\)",
        ),
        ({"r": -1}, r"r must be an int >= 0, got -1"),
        ({"r": 1.5}, r"r must be an int >= 0, got 1.5"),
        (
            {"metric": torch.randn(2, 5, 3)},
            r"metric must have shape \(B, N, Cm\) = \(2, 6, 3\), got shape \(2, 5, 3\)",
        ),
        (
            {"metric": torch.randn(3, 6, 3)},
            r"metric must have shape \(B, N, Cm\) = \(2, 6, 3\), got shape \(3, 6, 3\)",
        ),
        (
            {"size": torch.ones(2, 5)},
            r"size must have shape \(B, N\) = \(2, 6\), got shape \(2, 5\)",
        ),
        ({"size": torch.ones(2, 6, 1)}, r"size must have 2 dimensions \(B, N\), got shape"),
        (
            {"order": "random"},
            r"order must be one of \('ascending', 'descending', 'none'\), got 'random'",
        ),
        ({"protected": 7}, r"protected must be <= the number of tokens N = 6 .*, got 7"),
        ({"protected": -1}, r"protected must be an int >= 0, got -1"),
    ],
)
def test_invalid_inputs_name_the_argument(arguments, message):
    arguments = {"x": torch.randn(2, 6, 3), "r": 2, **arguments}
    with pytest.raises(ValueError, match=message):
        tome_merge(**arguments)


def test_proportional_bias_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"size must have 2 dimensions \(B, N\), got shape \(3,\)"):
        proportional_attention_bias(torch.ones(3))
