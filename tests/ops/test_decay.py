"""Log-decay sums (linvid.ops.decay) against their definitions written as plain loops, plus the
two properties the chunked WKV/SSD forms rely on: every exponent for a causal pair is <= 0,
and each sum is taken over exactly the terms it spans (a huge decay elsewhere in the sequence
does not wash out small ones, as a difference of long cumulative sums would)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linvid.ops.decay import segment_sum, sum_after, sum_before

SETTINGS = settings(max_examples=40, deadline=None)


def sum_before_loop(log_decay, dim):
    moved = log_decay.movedim(dim, -1)
    out = torch.stack([moved[..., :t].sum(-1) for t in range(moved.shape[-1])], dim=-1)
    return out.movedim(-1, dim)


def sum_after_loop(log_decay, dim):
    moved = log_decay.movedim(dim, -1)
    out = torch.stack([moved[..., t + 1 :].sum(-1) for t in range(moved.shape[-1])], dim=-1)
    return out.movedim(-1, dim)


def segment_sum_loop(log_decay):
    length = log_decay.shape[-1]
    out = torch.full((*log_decay.shape, length), float("-inf"), dtype=log_decay.dtype)
    for t in range(length):
        for s in range(t + 1):
            out[..., t, s] = log_decay[..., s + 1 : t + 1].sum(-1)
    return out


@st.composite
def log_decays(draw, min_ndim=1):
    """Non-positive float64 tensors mixing exact zeros, tiny, moderate and huge decays."""
    ndim = draw(st.integers(min_ndim, 4))
    shape = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scales = torch.tensor([0.0, 1e-6, 1e-3, 1.0, 20.0, 1e4], dtype=torch.float64)
    pick = torch.randint(0, len(scales), shape, generator=generator)
    return -scales[pick] * torch.rand(shape, generator=generator, dtype=torch.float64)


def assert_exact_span(actual, log_decay, expected):
    """actual is the float32 sum of the terms `expected` spans: its error is a few float32
    roundings of the spanned terms' own total, whatever lies outside the span."""
    span_size = expected.abs()  # all terms are <= 0, so |sum| is the sum of |terms|
    finite = torch.isfinite(expected)
    error = (actual.double() - expected).abs()[finite]
    assert (error <= 1e-6 * span_size[finite] + 1e-30).all()


@SETTINGS
@given(log_decay=log_decays(), data=st.data())
def test_sum_before_and_sum_after_match_their_definitions(log_decay, data):
    dim = data.draw(st.integers(-log_decay.ndim, log_decay.ndim - 1))
    for helper, loop in ((sum_before, sum_before_loop), (sum_after, sum_after_loop)):
        expected = loop(log_decay, dim)
        actual = helper(log_decay, dim)
        assert actual.shape == log_decay.shape and actual.dtype == log_decay.dtype
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
        assert (actual <= 0).all()
        assert_exact_span(helper(log_decay.float(), dim), log_decay, expected)


def test_sum_before_and_after_on_a_short_vector():
    log_decay = torch.tensor([-1.0, -2.0, -4.0, -8.0])
    assert sum_before(log_decay, 0).tolist() == [0.0, -1.0, -3.0, -7.0]
    assert sum_after(log_decay, 0).tolist() == [-14.0, -12.0, -8.0, 0.0]
    assert sum_before(log_decay[:1], 0).tolist() == [0.0]
    assert sum_after(log_decay[:1], -1).tolist() == [0.0]


@SETTINGS
@given(log_decay=log_decays())
def test_segment_sum_matches_its_definition(log_decay):
    expected = segment_sum_loop(log_decay)
    actual = segment_sum(log_decay)
    length = log_decay.shape[-1]
    assert actual.shape == (*log_decay.shape, length)
    upper = torch.ones(length, length, dtype=torch.bool).triu(1)
    assert (actual[..., upper] == float("-inf")).all()  # s > t: no causal path
    assert (actual.diagonal(dim1=-2, dim2=-1) == 0).all()  # s = t: nothing decays
    assert (actual[..., ~upper] <= 0).all()
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    assert_exact_span(segment_sum(log_decay.float()), log_decay, expected)


def test_small_decays_after_a_huge_one_keep_their_value():
    # cumsum differences would give (-1e4 - 2e-3) - (-1e4 - 1e-3): float32 spacing near 1e4 is
    # ~1e-3, so the answer would be 0 or -2e-3 instead of -1e-3.
    log_decay = torch.tensor([-1e4, -1e-3, -1e-3, -1e-3])
    torch.testing.assert_close(segment_sum(log_decay)[3, 2], torch.tensor(-1e-3))
    torch.testing.assert_close(segment_sum(log_decay)[3, 1], torch.tensor(-2e-3))
    torch.testing.assert_close(sum_after(log_decay, 0)[0], torch.tensor(-3e-3))
    torch.testing.assert_close(sum_before(log_decay.flip(0), 0)[3], torch.tensor(-3e-3))


@SETTINGS
@given(length=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_exp_segment_sum_is_the_scalar_recurrence_and_has_finite_gradients(length, seed):
    generator = torch.Generator().manual_seed(seed)
    log_decay = -5 * torch.rand(3, length, generator=generator, dtype=torch.float64)
    inputs = torch.randn(3, length, generator=generator, dtype=torch.float64)
    # h_t = exp(log_decay_t) h_{t-1} + inputs_t with h_{-1} = 0
    state, expected = torch.zeros(3, dtype=torch.float64), []
    for t in range(length):
        state = torch.exp(log_decay[:, t]) * state + inputs[:, t]
        expected.append(state)
    log_decay.requires_grad_(True)
    states = (torch.exp(segment_sum(log_decay)) @ inputs[..., None])[..., 0]
    torch.testing.assert_close(states, torch.stack(expected, dim=-1))
    # The -inf above the diagonal must not leak NaN into the gradient (SSD backpropagates
    # through exactly this product).
    (gradient,) = torch.autograd.grad(states.sum(), log_decay)
    assert torch.isfinite(gradient).all()
    assert torch.autograd.gradcheck(lambda x: torch.exp(segment_sum(x)).sum(), (log_decay,))


@pytest.mark.parametrize("helper", [sum_before, sum_after])
def test_helpers_keep_gradients(helper):
    log_decay = -torch.rand(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: helper(x, 1), (log_decay,))


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("helper", ["sum_before", "sum_after", "segment_sum"])
def test_minus_infinity_decays_give_minus_infinity_only_where_they_are_spanned(helper, dim):
    # exp(-inf) = 0 is a full reset; -inf passes every op's "<= 0" check and is what
    # -exp(logits) becomes when exp overflows. Every dim must agree with the definition.
    log_decay = -torch.rand(3, 5, 4, dtype=torch.float64)
    log_decay[1, 2, :] = float("-inf")
    log_decay[:, :, 1] = float("-inf")
    if helper == "segment_sum":
        expected, actual = segment_sum_loop(log_decay), segment_sum(log_decay)
    else:
        loop = sum_before_loop if helper == "sum_before" else sum_after_loop
        function = sum_before if helper == "sum_before" else sum_after
        expected, actual = loop(log_decay, dim), function(log_decay, dim)
    assert not actual.isnan().any()
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.fixture
def medium_float32_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("helper", [sum_before, sum_after])
def test_sums_stay_exact_when_float32_matmuls_may_use_bfloat16(
    helper, medium_float32_matmul_precision
):
    # A common training setting; on CPUs with bf16 units (AVX512-BF16 / AMX) oneDNN then runs
    # float32 matmuls in bfloat16, which would round the exponents to 8 significant bits.
    generator = torch.Generator().manual_seed(0)
    log_decay = -20 * torch.rand(2, 64, 8, generator=generator)
    for dim in (0, 1, 2):
        expected = (sum_before_loop if helper is sum_before else sum_after_loop)(
            log_decay.double(), dim
        )
        assert_exact_span(helper(log_decay, dim), log_decay, expected)
