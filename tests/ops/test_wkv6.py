"""RWKV-6 WKV (DESIGN.md "Math conventions"): the chunked and one-token forms against the
per-token reference, and all three against a float64 loop written here from the equations

    o_t = scale * r_t @ (S_{t-1} + (u * k_t)^T v_t)
    S_t = diag(exp(w_t)) @ S_{t-1} + k_t^T v_t

Tolerances are relative to the *magnitude* of each output, the same recurrence run on |r|,
|k|, |v|, |u|, |S_0| (every term of the sum taken positive): a float32 sum of n terms is off
by at most ~n * 6e-8 times the sum of their absolute values, and in practice by ~sqrt(n) *
6e-8. With up to ~500 terms per output here, 1e-5 of the magnitude leaves a 40x margin over
the largest error measured while writing these tests (~2.5e-7), yet any wrong decay exponent,
missing term or misplaced chunk boundary shows up orders of magnitude above it.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linvid.ops.wkv6 import wkv6_chunk, wkv6_recurrent, wkv6_step, wkv6_step_trusted

SETTINGS = settings(max_examples=40, deadline=None)
TOLERANCE = 1e-5  # of the output magnitude, see the module docstring
DECAY_MODES = ("zero", "strong", "uniform", "near_zero", "mixture")


def wkv6_float64(r, k, v, w, u, *, scale=1.0, initial_state=None):
    """The DESIGN.md equations one token at a time in float64. Returns (o, final_state)."""
    r, k, v, w, u = (tensor.double() for tensor in (r, k, v, w, u))
    batch, length, heads, key_dim = r.shape
    state = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float64)
    if initial_state is not None:
        state = initial_state.double().clone()
    outputs = torch.zeros(batch, length, heads, v.shape[-1], dtype=torch.float64)
    for t in range(length):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, K, V): k_t^T v_t
        outputs[:, t] = scale * torch.einsum("bhk,bhkv->bhv", r[:, t], state + u[..., None] * kv)
        state = torch.exp(w[:, t])[..., None] * state + kv
    return outputs, state


def magnitude(r, k, v, w, u, *, scale=1.0, initial_state=None):
    """Sum of the absolute values of the terms behind each output and state entry."""
    state = None if initial_state is None else initial_state.abs()
    return wkv6_float64(
        r.abs(), k.abs(), v.abs(), w, u.abs(), scale=abs(scale), initial_state=state
    )


def assert_close(actual, expected, scale, tolerance=TOLERANCE, what="output"):
    error = (actual.double() - expected.double()).abs()
    # The floor keeps entries whose terms are all ~0 (e.g. fully decayed) from needing 0 error.
    bound = tolerance * (scale + 1e-6 * scale.max() + 1e-30)
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.3g} x the allowed {tolerance:g} of its magnitude"


def log_decays(generator, shape, mode):
    """w <= 0 per step: exactly 0, exactly -20, uniform in [-20, 0], near 0, or a mixture."""
    if mode == "zero":
        return torch.zeros(shape)
    if mode == "strong":
        return torch.full(shape, -20.0)
    if mode == "uniform":
        return -20.0 * torch.rand(shape, generator=generator)
    if mode == "near_zero":
        return -1e-3 * torch.rand(shape, generator=generator)
    options = torch.stack(
        [
            torch.zeros(shape),
            torch.full(shape, -20.0),
            -20.0 * torch.rand(shape, generator=generator),
            -1e-3 * torch.rand(shape, generator=generator),
        ]
    )
    choice = torch.randint(0, 4, (1, *shape), generator=generator)
    return options.gather(0, choice)[0]


def make_inputs(seed, batch, length, heads, key_dim, value_dim, decay, with_state):
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(batch, length, heads, key_dim, generator=generator)
    k = torch.randn(batch, length, heads, key_dim, generator=generator)
    v = torch.randn(batch, length, heads, value_dim, generator=generator)
    w = log_decays(generator, (batch, length, heads, key_dim), decay)
    u = torch.randn(heads, key_dim, generator=generator)
    state = None
    if with_state:
        state = torch.randn(batch, heads, key_dim, value_dim, generator=generator)
    return r, k, v, w, u, state


# None is the default (64); small sizes make many chunks, sizes above T make a padded one.
chunk_sizes = st.one_of(
    st.sampled_from([None, 1, 2, 3, 5, 7, 16, 64]), st.integers(1, 12), st.integers(1, 80)
)
scales = st.sampled_from([1.0, 0.5, 0.125, 2.0])


@st.composite
def cases(draw, max_length=70):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, 2)),
        # T = 1 comes up often by itself (hypothesis favours boundaries); bias towards long T.
        length=draw(
            st.one_of(st.integers(1, max_length), st.integers(max_length // 2, max_length))
        ),
        heads=draw(st.integers(1, 3)),
        key_dim=draw(st.integers(1, 6)),
        value_dim=draw(st.integers(1, 6)),
        decay=draw(st.sampled_from(DECAY_MODES)),
        with_state=draw(st.booleans()),
    )


@SETTINGS
@given(case=cases(), chunk_size=chunk_sizes, scale=scales)
def test_recurrent_and_chunk_match_the_float64_equations(case, chunk_size, scale):
    r, k, v, w, u, state = make_inputs(**case)
    expected, expected_state = wkv6_float64(r, k, v, w, u, scale=scale, initial_state=state)
    size, state_size = magnitude(r, k, v, w, u, scale=scale, initial_state=state)

    reference, reference_state = wkv6_recurrent(r, k, v, w, u, scale=scale, initial_state=state)
    chunked, chunked_state = wkv6_chunk(
        r, k, v, w, u, scale=scale, initial_state=state, chunk_size=chunk_size
    )
    for output, final_state in ((reference, reference_state), (chunked, chunked_state)):
        assert output.shape == v.shape and output.dtype == torch.float32
        assert final_state.shape == expected_state.shape and final_state.dtype == torch.float32
        assert_close(output, expected, size)
        assert_close(final_state, expected_state, state_size)
    assert_close(chunked, reference, size)
    assert_close(chunked_state, reference_state, state_size)


def test_hand_computed_two_tokens():
    # B = H = K = V = 1: o_0 = s*r0*u*k0*v0, S_0 = k0*v0; o_1 = s*r1*(S_0 + u*k1*v1),
    # S_1 = exp(w1)*S_0 + k1*v1.
    r = torch.tensor([2.0, 3.0]).reshape(1, 2, 1, 1)
    k = torch.tensor([5.0, 7.0]).reshape(1, 2, 1, 1)
    v = torch.tensor([11.0, 13.0]).reshape(1, 2, 1, 1)
    w = torch.tensor([-1.0, -2.0]).reshape(1, 2, 1, 1)
    u = torch.tensor([[0.5]])
    expected_output = [0.5 * 2 * 0.5 * 5 * 11, 0.5 * 3 * (5 * 11 + 0.5 * 7 * 13)]
    expected_state = torch.exp(torch.tensor(-2.0)) * 55 + 91
    for form in (wkv6_recurrent, wkv6_chunk):
        output, state = form(r, k, v, w, u, scale=0.5)
        torch.testing.assert_close(output.flatten(), torch.tensor(expected_output))
        torch.testing.assert_close(state.flatten(), expected_state.reshape(1))


@SETTINGS
@given(
    case=cases(),
    split=st.floats(0, 1),
    chunk_sizes=st.tuples(chunk_sizes, chunk_sizes),
    scale=scales,
)
def test_two_calls_carrying_the_state_equal_one_call(case, split, chunk_sizes, scale):
    r, k, v, w, u, state = make_inputs(**case)
    cut = round(split * case["length"])
    first, second = slice(0, cut), slice(cut, None)
    size, state_size = magnitude(r, k, v, w, u, scale=scale, initial_state=state)

    def halves(form, first_options, second_options):
        head, middle = form(
            *(tensor[:, first] for tensor in (r, k, v, w)),
            u,
            scale=scale,
            initial_state=state,
            **first_options,
        )
        tail, end = form(
            *(tensor[:, second] for tensor in (r, k, v, w)),
            u,
            scale=scale,
            initial_state=middle,
            **second_options,
        )
        return torch.cat([head, tail], dim=1), end

    whole, whole_state = wkv6_recurrent(r, k, v, w, u, scale=scale, initial_state=state)
    joined, end = halves(wkv6_recurrent, {}, {})
    # The reference does the same float32 operations either way: bitwise equal.
    assert torch.equal(joined, whole)
    assert torch.equal(end, whole_state)

    whole, whole_state = wkv6_chunk(
        r, k, v, w, u, scale=scale, initial_state=state, chunk_size=chunk_sizes[0]
    )
    joined, end = halves(
        wkv6_chunk, dict(chunk_size=chunk_sizes[0]), dict(chunk_size=chunk_sizes[1])
    )
    assert_close(joined, whole, size)
    assert_close(end, whole_state, state_size)


@SETTINGS
@given(case=cases(max_length=40), prefill=st.floats(0, 1), chunk_size=chunk_sizes, scale=scales)
def test_decoding_with_steps_after_a_chunked_prefill_equals_one_chunked_call(
    case, prefill, chunk_size, scale
):
    r, k, v, w, u, state = make_inputs(**case)
    cut = round(prefill * case["length"])
    size, state_size = magnitude(r, k, v, w, u, scale=scale, initial_state=state)
    whole, whole_state = wkv6_chunk(
        r, k, v, w, u, scale=scale, initial_state=state, chunk_size=chunk_size
    )

    outputs, running = wkv6_chunk(
        r[:, :cut],
        k[:, :cut],
        v[:, :cut],
        w[:, :cut],
        u,
        scale=scale,
        initial_state=state,
        chunk_size=chunk_size,
    )
    outputs = [outputs]
    for t in range(cut, case["length"]):
        output, running = wkv6_step(r[:, t], k[:, t], v[:, t], w[:, t], u, running, scale=scale)
        assert output.shape == v[:, t].shape and running.dtype == torch.float32
        outputs.append(output[:, None])
    assert_close(torch.cat(outputs, dim=1), whole, size)
    assert_close(running, whole_state, state_size)


def gradient_magnitudes(inputs, output_weights, state_weights, scale):
    """For each input, the sum of the absolute values of the terms of d(loss)/d(input): the
    gradient of the float64 loss with every input, weight and cotangent taken positive (w only
    enters through exp(w), whose derivative is positive too)."""
    r, k, v, w, u, state = (
        (tensor if name == "w" else tensor.abs()).double().requires_grad_(True)
        for name, tensor in zip("rkvwus", inputs, strict=True)
    )
    output, final_state = wkv6_float64(r, k, v, w, u, scale=abs(scale), initial_state=state)
    loss = (output * output_weights.abs()).sum() + (final_state * state_weights.abs()).sum()
    return torch.autograd.grad(loss, (r, k, v, w, u, state))


@settings(max_examples=25, deadline=None)
@given(case=cases(max_length=24), chunk_size=chunk_sizes, scale=scales)
def test_chunk_gradients_match_autograd_through_the_reference(case, chunk_size, scale):
    case["with_state"] = True
    inputs = make_inputs(**case)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    output_weights = torch.randn(inputs[2].shape, generator=generator)
    state_weights = torch.randn(inputs[5].shape, generator=generator)

    def gradients(form, **options):
        leaves = [tensor.clone().requires_grad_(True) for tensor in inputs]
        r, k, v, w, u, state = leaves
        output, final_state = form(r, k, v, w, u, scale=scale, initial_state=state, **options)
        loss = (output * output_weights).sum() + (final_state * state_weights).sum()
        return torch.autograd.grad(loss, leaves)

    expected = gradients(wkv6_recurrent)
    actual = gradients(wkv6_chunk, chunk_size=chunk_size)
    sizes = gradient_magnitudes(inputs, output_weights, state_weights, scale)
    names = ("r", "k", "v", "w", "u", "initial_state")
    for name, got, want, size in zip(names, actual, expected, sizes, strict=True):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        # Gradients are float32 sums too, and can cancel (d/du sums r k v over all tokens), so
        # the tolerance is relative to their magnitude as for the outputs.
        assert_close(got, want, size, what=f"gradient of {name}")


@settings(max_examples=25, deadline=None)
@given(case=cases(max_length=40), chunk_size=chunk_sizes, scale=scales)
def test_bfloat16_inputs_give_bfloat16_outputs_and_float32_states(case, chunk_size, scale):
    inputs = make_inputs(**case)
    state = inputs[5]
    r, k, v, w, u = (tensor.bfloat16() for tensor in inputs[:5])
    # The float32 result on the same (bf16-rounded) values: only the output's rounding differs.
    upcast = [tensor.float() for tensor in (r, k, v, w, u)]
    size, state_size = magnitude(*upcast, scale=scale, initial_state=state)
    expected, expected_state = wkv6_recurrent(*upcast, scale=scale, initial_state=state)

    step_output, step_state = wkv6_step(
        r[:, 0],
        k[:, 0],
        v[:, 0],
        w[:, 0],
        u,
        torch.zeros_like(expected_state) if state is None else state,
        scale=scale,
    )
    assert step_output.dtype == torch.bfloat16 and step_state.dtype == torch.float32
    runs = (
        wkv6_recurrent(r, k, v, w, u, scale=scale, initial_state=state),
        wkv6_chunk(r, k, v, w, u, scale=scale, initial_state=state, chunk_size=chunk_size),
    )
    for output, final_state in runs:
        assert output.dtype == torch.bfloat16 and final_state.dtype == torch.float32
        # bf16 keeps 8 significant bits: rounding moves a value by at most 2^-9 of itself.
        rounding = (output.float() - expected).abs()
        assert (rounding <= 2**-8 * expected.abs() + TOLERANCE * size + 1e-30).all()
        assert_close(final_state, expected_state, state_size)


def wkv6_float64_long(r, k, v, w, u):
    """wkv6_float64 for B = H = 1, keeping only the state in the loop; also returns the
    magnitudes of the outputs and of the final state."""
    r, k, v, w, u = (tensor[0, :, 0].double() for tensor in (r, k, v, w, u[None, None]))
    decay = torch.exp(w)[:, :, None]  # (T, K, 1)
    kv = k[:, :, None] * v[:, None, :]  # (T, K, V)
    length, key_dim, value_dim = kv.shape
    state = torch.zeros(key_dim, value_dim, dtype=torch.float64)
    state_size = torch.zeros_like(state)
    before = torch.empty(length, key_dim, value_dim, dtype=torch.float64)  # S_{t-1}
    before_size = torch.empty_like(before)
    for t in range(length):
        before[t], before_size[t] = state, state_size
        state = decay[t] * state + kv[t]
        state_size = decay[t] * state_size + kv[t].abs()
    bonus = (r * u * k).sum(-1, keepdim=True) * v
    outputs = torch.einsum("tk,tkv->tv", r, before) + bonus
    bonus_size = (r * u * k).abs().sum(-1, keepdim=True) * v.abs()
    size = torch.einsum("tk,tkv->tv", r.abs(), before_size) + bonus_size
    return outputs, state, size, state_size


@pytest.mark.parametrize("decay", ["strong", "near_zero", "zero", "mixture"])
def test_fifty_thousand_tokens_stay_finite_and_match_float64(decay):
    length, dim = 50_000, 8
    r, k, v, w, u, _ = make_inputs(7, 1, length, 1, dim, dim, decay, with_state=False)
    output, final_state = wkv6_chunk(r, k, v, w, u)
    assert torch.isfinite(output).all() and torch.isfinite(final_state).all()
    expected, expected_state, size, state_size = wkv6_float64_long(r, k, v, w, u)
    assert_close(output[0, :, 0], expected, size)
    assert_close(final_state[0, 0], expected_state, state_size)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_a_log_decay_of_minus_infinity_forgets_the_state_as_in_the_reference(chunk_size):
    # w = -inf (a decay of exactly 0) passes validation (it is <= 0) and is what
    # w = -exp(logits) gives once exp overflows (logits > 88.7 in float32, > 11 in float16).
    r, k, v, w, u, state = make_inputs(5, 2, 12, 2, 3, 4, "uniform", with_state=True)
    w[:, 5, :, 0] = float("-inf")
    w[0, 0, 1, :] = float("-inf")
    expected, expected_state = wkv6_float64(r, k, v, w, u, initial_state=state)
    size, state_size = magnitude(r, k, v, w, u, initial_state=state)
    for output, final_state in (
        wkv6_recurrent(r, k, v, w, u, initial_state=state),
        wkv6_chunk(r, k, v, w, u, initial_state=state, chunk_size=chunk_size),
    ):
        assert torch.isfinite(output).all() and torch.isfinite(final_state).all()
        assert_close(output, expected, size)
        assert_close(final_state, expected_state, state_size, what="final state")


def test_empty_sequence_returns_the_initial_state():
    r, k, v, w, u, state = make_inputs(0, 2, 0, 3, 4, 5, "uniform", with_state=True)
    for form in (wkv6_recurrent, wkv6_chunk):
        output, final_state = form(r, k, v, w, u, initial_state=state)
        assert output.shape == (2, 0, 3, 5)
        assert torch.equal(final_state, state)


def _valid():
    r, k, v, w, u, state = make_inputs(0, 2, 5, 3, 4, 6, "uniform", with_state=True)
    return dict(r=r, k=k, v=v, w=w, u=u, initial_state=state)


def _call(form, **changes):
    arguments = {**_valid(), **changes}
    if form is wkv6_step:
        token = {name: arguments[name][:, 0] for name in ("r", "k", "v", "w")}
        return wkv6_step(**token, u=arguments["u"], state=arguments["initial_state"])
    return form(**arguments)


@pytest.mark.parametrize("form", [wkv6_recurrent, wkv6_chunk, wkv6_step])
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(v=torch.randn(2, 4, 3, 6)), r"^v must have shape"),  # T of v != T of r
        (dict(k=torch.randn(2, 5, 3, 5)), r"^k must have shape"),
        (dict(w=torch.full((2, 5, 3, 4), 0.1)), r"^w is the log decay and must be <= 0"),
        (dict(u=torch.randn(3, 5)), r"^u must have shape \(H, K\)"),
        (dict(r=torch.ones(2, 5, 3, 4, dtype=torch.long)), r"^r must be a floating-point"),
    ],
)
def test_invalid_inputs_raise_value_errors_naming_the_argument(form, changes, message):
    if form is wkv6_step and "v" in changes:
        changes = dict(v=torch.randn(2, 5, 2, 6))  # no T in a step: mismatch H instead
    with pytest.raises(ValueError, match=message):
        _call(form, **changes)


@pytest.mark.parametrize("form", [wkv6_recurrent, wkv6_chunk])
def test_wrong_initial_state_shape_names_initial_state(form):
    with pytest.raises(ValueError, match=r"^initial_state must have shape \(B, H, K, V\)"):
        _call(form, initial_state=torch.zeros(2, 3, 6, 4))


def test_wrong_step_state_shape_names_state():
    # wkv6_step's argument is called `state`; the message must say which argument was wrong.
    with pytest.raises(ValueError, match=r"^state must have shape \(B, H, K, V\)"):
        _call(wkv6_step, initial_state=torch.zeros(2, 3, 6, 4))


@pytest.mark.parametrize("chunk_size", [0, -3, 2.0])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    with pytest.raises(ValueError, match=r"^chunk_size must be an int >= 1"):
        wkv6_chunk(**_valid(), chunk_size=chunk_size)


@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_trusted_step_equals_step(scale):
    generator = torch.Generator().manual_seed(7)
    batch, heads, key_dim, value_dim = 2, 3, 4, 5

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    r, k = rand(batch, heads, key_dim), rand(batch, heads, key_dim)
    w = -rand(batch, heads, key_dim).exp()
    v, u = rand(batch, heads, value_dim), rand(heads, key_dim)
    state = rand(batch, heads, key_dim, value_dim)
    want, want_state = wkv6_step(r, k, v, w, u, state, scale=scale)
    got, got_state = wkv6_step_trusted(r, k, v, w, u, state, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_state, want_state, rtol=1e-6, atol=1e-6)
