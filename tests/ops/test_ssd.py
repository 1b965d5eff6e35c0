"""Mamba-2 SSD (DESIGN.md "Math conventions"): the chunked and one-token forms against the
per-token reference, all three against a float64 loop written here from the equations

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * outer(x_t, B_t)
    y_t = h_t @ C_t + D_h * x_t                   (head h reads group h // (H // G))

and ssd_chunk against an independent implementation, HF transformers' mamba2_chunk_scan.

Tolerances are relative to the *magnitude* of each output, the same recurrence run on |x|,
|B|, |C|, |D|, |h_0| (every term of the sum taken positive; dt and exp(dt * A) already are):
a float32 sum of n terms is off by at most ~n * 6e-8 times the sum of their absolute values,
in practice ~sqrt(n) * 6e-8. With up to ~400 terms per output here, 1e-5 of the magnitude
leaves a 40x margin over the largest error measured while writing these tests (~2.3e-7).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

from linvid.ops.ssd import ssd_chunk, ssd_recurrent, ssd_step, ssd_step_grouped

SETTINGS = settings(max_examples=40, deadline=None)
TOLERANCE = 1e-5  # of the output magnitude, see the module docstring
DECAY_MODES = ("zero", "weak", "uniform", "strong", "mixture")


def ssd_float64(x, dt, A, B, C, *, D=None, initial_state=None, decay_dt=None):
    """The DESIGN.md equations one token at a time in float64. Returns (y, final_state).
    decay_dt, if given, replaces dt inside exp(dt * A) only (see gradient_magnitudes)."""
    decay_dt = dt if decay_dt is None else decay_dt
    x, dt, decay_dt, A, B, C = (tensor.double() for tensor in (x, dt, decay_dt, A, B, C))
    batch, length, heads, head_dim = x.shape
    repeats = heads // B.shape[2]
    B, C = B.repeat_interleave(repeats, dim=2), C.repeat_interleave(repeats, dim=2)  # (B,T,H,N)
    state = torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=torch.float64)
    if initial_state is not None:
        state = initial_state.double().clone()
    outputs = torch.zeros(batch, length, heads, head_dim, dtype=torch.float64)
    for t in range(length):
        decay = torch.exp(decay_dt[:, t] * A)[..., None, None]  # (B, H, 1, 1)
        state = decay * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None]
        outputs[:, t] = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        if D is not None:
            outputs[:, t] += D.double()[:, None] * x[:, t]
    return outputs, state


def magnitude(x, dt, A, B, C, *, D=None, initial_state=None):
    """Sum of the absolute values of the terms behind each output and state entry."""
    return ssd_float64(
        x.abs(),
        dt,
        A,
        B.abs(),
        C.abs(),
        D=None if D is None else D.abs(),
        initial_state=None if initial_state is None else initial_state.abs(),
    )


def assert_close(actual, expected, scale, tolerance=TOLERANCE, what="output"):
    error = (actual.double() - expected.double()).abs()
    # The floor keeps entries whose terms are all ~0 (e.g. fully decayed) from needing 0 error.
    bound = tolerance * (scale + 1e-6 * scale.max() + 1e-30)
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.3g} x the allowed {tolerance:g} of its magnitude"


def decays(generator, batch, length, heads, mode):
    """(dt >= 0, A <= 0) with dt * A per step from exactly 0 down to about -2000."""
    dt = torch.rand(batch, length, heads, generator=generator)
    if mode == "zero":
        return 2 * dt, torch.zeros(heads)
    if mode == "weak":
        return dt, -1e-4 * torch.rand(heads, generator=generator)
    if mode == "uniform":
        return dt, -20.0 * torch.rand(heads, generator=generator)
    if mode == "strong":
        return 0.5 + 1.5 * dt, -100.0 - 900.0 * torch.rand(heads, generator=generator)
    # Per head one of the rates above; per step dt = 0 (no input, no decay), small, or 10.
    rates = torch.tensor([0.0, -1e-4, -1.0, -20.0, -1000.0])
    A = rates[torch.randint(0, len(rates), (heads,), generator=generator)]
    steps = torch.stack([torch.zeros_like(dt), dt, torch.full_like(dt, 10.0)])
    choice = torch.randint(0, 3, (1, batch, length, heads), generator=generator)
    return steps.gather(0, choice)[0], A


def make_inputs(
    seed, batch, length, groups, repeats, head_dim, state_dim, decay, with_D, with_state
):
    generator = torch.Generator().manual_seed(seed)
    heads = groups * repeats
    x = torch.randn(batch, length, heads, head_dim, generator=generator)
    dt, A = decays(generator, batch, length, heads, decay)
    B = torch.randn(batch, length, groups, state_dim, generator=generator)
    C = torch.randn(batch, length, groups, state_dim, generator=generator)
    D = torch.randn(heads, generator=generator) if with_D else None
    state = None
    if with_state:
        state = torch.randn(batch, heads, head_dim, state_dim, generator=generator)
    return x, dt, A, B, C, D, state


# Small sizes make many chunks, sizes above T make one padded chunk.
chunk_sizes = st.one_of(
    st.sampled_from([1, 2, 3, 5, 7, 16, 64]), st.integers(1, 12), st.integers(1, 80)
)


@st.composite
def cases(draw, max_length=70, decay_modes=DECAY_MODES):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, 2)),
        # T = 1 comes up often by itself (hypothesis favours boundaries); bias towards long T.
        length=draw(
            st.one_of(st.integers(1, max_length), st.integers(max_length // 2, max_length))
        ),
        groups=draw(st.integers(1, 3)),
        repeats=draw(st.integers(1, 3)),
        head_dim=draw(st.integers(1, 5)),
        state_dim=draw(st.integers(1, 5)),
        decay=draw(st.sampled_from(decay_modes)),
        with_D=draw(st.booleans()),
        with_state=draw(st.booleans()),
    )


def run(form, inputs, **options):
    x, dt, A, B, C, D, state = inputs
    return form(x, dt, A, B, C, D=D, initial_state=state, **options)


@SETTINGS
@given(case=cases(), chunk_size=chunk_sizes)
def test_recurrent_and_chunk_match_the_float64_equations(case, chunk_size):
    inputs = make_inputs(**case)
    expected, expected_state = run(ssd_float64, inputs)
    size, state_size = run(magnitude, inputs)

    reference, reference_state = run(ssd_recurrent, inputs)
    chunked, chunked_state = run(ssd_chunk, inputs, chunk_size=chunk_size)
    for output, final_state in ((reference, reference_state), (chunked, chunked_state)):
        assert output.shape == inputs[0].shape and output.dtype == torch.float32
        assert final_state.shape == expected_state.shape and final_state.dtype == torch.float32
        assert_close(output, expected, size)
        assert_close(final_state, expected_state, state_size)
    assert_close(chunked, reference, size)
    assert_close(chunked_state, reference_state, state_size)


def test_hand_computed_two_tokens_with_two_groups():
    # H = 2 heads, G = 2 groups, P = N = 1: head h reads group h, decays independently.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    dt = torch.tensor([[0.5, 1.0], [2.0, 0.25]]).reshape(1, 2, 2)
    A = torch.tensor([-1.0, -2.0])
    B = torch.tensor([[5.0, 6.0], [7.0, 8.0]]).reshape(1, 2, 2, 1)
    C = torch.tensor([[0.5, 1.5], [2.5, 3.5]]).reshape(1, 2, 2, 1)
    D = torch.tensor([10.0, 100.0])
    e = torch.exp
    state_0 = torch.tensor([0.5 * 1 * 5, 1.0 * 2 * 6])
    state_1 = torch.stack(
        [
            e(torch.tensor(-2.0)) * state_0[0] + 2 * 3 * 7,
            e(torch.tensor(-0.5)) * state_0[1] + 0.25 * 4 * 8,
        ]
    )
    expected = torch.stack(
        [
            state_0 * torch.tensor([0.5, 1.5]) + D * torch.tensor([1.0, 2.0]),
            state_1 * torch.tensor([2.5, 3.5]) + D * torch.tensor([3.0, 4.0]),
        ]
    )
    for form in (ssd_recurrent, ssd_chunk):
        y, state = form(x, dt, A, B, C, D=D)
        torch.testing.assert_close(y.flatten(), expected.flatten())
        torch.testing.assert_close(state.flatten(), state_1)


@SETTINGS
@given(case=cases(), split=st.floats(0, 1), chunk_sizes=st.tuples(chunk_sizes, chunk_sizes))
def test_two_calls_carrying_the_state_equal_one_call(case, split, chunk_sizes):
    inputs = make_inputs(**case)
    x, dt, A, B, C, D, state = inputs
    cut = round(split * case["length"])
    first, second = slice(0, cut), slice(cut, None)
    size, state_size = run(magnitude, inputs)

    def halves(form, first_options, second_options):
        head, middle = form(
            x[:, first],
            dt[:, first],
            A,
            B[:, first],
            C[:, first],
            D=D,
            initial_state=state,
            **first_options,
        )
        tail, end = form(
            x[:, second],
            dt[:, second],
            A,
            B[:, second],
            C[:, second],
            D=D,
            initial_state=middle,
            **second_options,
        )
        return torch.cat([head, tail], dim=1), end

    whole, whole_state = run(ssd_recurrent, inputs)
    joined, end = halves(ssd_recurrent, {}, {})
    # The reference does the same float32 operations either way: bitwise equal.
    assert torch.equal(joined, whole) and torch.equal(end, whole_state)

    whole, whole_state = run(ssd_chunk, inputs, chunk_size=chunk_sizes[0])
    joined, end = halves(
        ssd_chunk, dict(chunk_size=chunk_sizes[0]), dict(chunk_size=chunk_sizes[1])
    )
    assert_close(joined, whole, size)
    assert_close(end, whole_state, state_size)


@SETTINGS
@given(case=cases(max_length=40), prefill=st.floats(0, 1), chunk_size=chunk_sizes)
def test_decoding_with_steps_after_a_chunked_prefill_equals_one_chunked_call(
    case, prefill, chunk_size
):
    inputs = make_inputs(**case)
    x, dt, A, B, C, D, state = inputs
    cut = round(prefill * case["length"])
    size, state_size = run(magnitude, inputs)
    whole, whole_state = run(ssd_chunk, inputs, chunk_size=chunk_size)

    outputs, running = ssd_chunk(
        x[:, :cut],
        dt[:, :cut],
        A,
        B[:, :cut],
        C[:, :cut],
        D=D,
        initial_state=state,
        chunk_size=chunk_size,
    )
    outputs = [outputs]
    for t in range(cut, case["length"]):
        output, running = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], running, D=D)
        assert output.shape == x[:, t].shape and running.dtype == torch.float32
        outputs.append(output[:, None])
    assert_close(torch.cat(outputs, dim=1), whole, size)
    assert_close(running, whole_state, state_size)


def gradient_magnitudes(inputs, output_weights, state_weights):
    """For each input, the sum of the absolute values of the terms of d(loss)/d(input): the
    gradient of the float64 loss with x, B, C, D, h_0 and the cotangents taken positive. dt
    enters twice, as the step (derivative >= 0) and in exp(dt * A) (derivative A exp(.) <= 0),
    so the two are separate leaves whose gradients' absolute values add up; A only decays."""
    x, dt, A, B, C, D, state = inputs
    decay_dt = dt.double().requires_grad_(True)
    leaves = [x.abs(), dt, A, B.abs(), C.abs(), D.abs(), state.abs()]
    x, dt, A, B, C, D, state = (tensor.double().requires_grad_(True) for tensor in leaves)
    output, final_state = ssd_float64(x, dt, A, B, C, D=D, initial_state=state, decay_dt=decay_dt)
    loss = (output * output_weights.abs()).sum() + (final_state * state_weights.abs()).sum()
    sizes = torch.autograd.grad(loss, (x, dt, A, B, C, D, state, decay_dt))
    return (*sizes[:1], sizes[1] + sizes[7].abs(), sizes[2].abs(), *sizes[3:7])


@settings(max_examples=25, deadline=None)
@given(case=cases(max_length=24), chunk_size=chunk_sizes)
def test_chunk_gradients_match_autograd_through_the_reference(case, chunk_size):
    case.update(with_D=True, with_state=True)
    inputs = make_inputs(**case)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    output_weights = torch.randn(inputs[0].shape, generator=generator)
    state_weights = torch.randn(inputs[6].shape, generator=generator)

    def gradients(form, **options):
        leaves = [tensor.clone().requires_grad_(True) for tensor in inputs]
        output, final_state = run(form, leaves, **options)
        loss = (output * output_weights).sum() + (final_state * state_weights).sum()
        return torch.autograd.grad(loss, leaves)

    expected = gradients(ssd_recurrent)
    actual = gradients(ssd_chunk, chunk_size=chunk_size)
    sizes = gradient_magnitudes(inputs, output_weights, state_weights)
    names = ("x", "dt", "A", "B", "C", "D", "initial_state")
    for name, got, want, size in zip(names, actual, expected, sizes, strict=True):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        # Gradients are float32 sums too, and can cancel (d/dD sums x times the cotangent over
        # all tokens), so the tolerance is relative to their magnitude as for the outputs.
        assert_close(got, want, size, what=f"gradient of {name}")


@settings(max_examples=25, deadline=None)
@given(case=cases(max_length=40), chunk_size=chunk_sizes)
def test_bfloat16_inputs_give_bfloat16_outputs_and_float32_states(case, chunk_size):
    inputs = make_inputs(**case)
    state = inputs[6]
    low = [None if tensor is None else tensor.bfloat16() for tensor in inputs[:6]]
    # The float32 result on the same (bf16-rounded) values: only the output's rounding differs.
    upcast = [None if tensor is None else tensor.float() for tensor in low] + [state]
    size, state_size = run(magnitude, upcast)
    expected, expected_state = run(ssd_recurrent, upcast)

    x, dt, A, B, C, D = low
    zeros = torch.zeros_like(expected_state)
    step_output, step_state = ssd_step(
        x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], zeros if state is None else state, D=D
    )
    assert step_output.dtype == torch.bfloat16 and step_state.dtype == torch.float32
    runs = (run(ssd_recurrent, low + [state]), run(ssd_chunk, low + [state], chunk_size=chunk_size))
    for output, final_state in runs:
        assert output.dtype == torch.bfloat16 and final_state.dtype == torch.float32
        # bf16 keeps 8 significant bits: rounding moves a value by at most 2^-9 of itself.
        rounding = (output.float() - expected).abs()
        assert (rounding <= 2**-8 * expected.abs() + TOLERANCE * size + 1e-30).all()
        assert_close(final_state, expected_state, state_size)


@SETTINGS
@given(
    case=cases(max_length=50, decay_modes=("zero", "weak", "uniform")),
    chunk_size=st.integers(1, 32),
)
def test_chunk_matches_transformers_mamba2_chunk_scan(case, chunk_size):
    x, dt, A, B, C, D, state = make_inputs(**case)
    size, state_size = magnitude(x, dt, A, B, C, D=D, initial_state=state)
    expected, expected_state = mamba2_chunk_scan(
        x, dt, A, B, C, chunk_size, D=D, initial_states=state, return_final_states=True
    )
    output, final_state = ssd_chunk(x, dt, A, B, C, D=D, initial_state=state, chunk_size=chunk_size)
    # HF takes decays as differences of within-chunk cumulative sums (|sum| <= 20 * 32 here),
    # which costs up to ~|sum| * 6e-8 relative: hence 1e-4 rather than 1e-5.
    assert_close(output, expected, size, tolerance=1e-4)
    assert_close(final_state, expected_state, state_size, tolerance=1e-4)


def ssd_float64_long(x, dt, A, B, C):
    """ssd_float64 for B = H = G = 1, keeping only the state in the loop; also returns the
    magnitudes of the outputs and of the final state."""
    x, dt, B, C = (tensor[0, :, 0].double() for tensor in (x, dt, B, C))
    decay = torch.exp(dt * A.double()[0])  # (T,)
    inputs = (dt[:, None] * x)[:, :, None] * B[:, None, :]  # (T, P, N)
    state = torch.zeros(inputs.shape[1:], dtype=torch.float64)
    state_size = torch.zeros_like(state)
    states = torch.empty_like(inputs)
    sizes = torch.empty_like(inputs)
    for t in range(len(decay)):
        state = decay[t] * state + inputs[t]
        state_size = decay[t] * state_size + inputs[t].abs()
        states[t], sizes[t] = state, state_size
    outputs = torch.einsum("tpn,tn->tp", states, C)
    return outputs, state, torch.einsum("tpn,tn->tp", sizes, C.abs()), state_size


@pytest.mark.parametrize(("A", "dt_low"), [(-20.0, 0.5), (-1e-4, 0.0), (0.0, 0.0), (-1e3, 0.0)])
def test_fifty_thousand_tokens_stay_finite_and_match_float64(A, dt_low):
    generator = torch.Generator().manual_seed(3)
    length, dim = 50_000, 8
    x = torch.randn(1, length, 1, dim, generator=generator)
    dt = dt_low + torch.rand(1, length, 1, generator=generator)
    A = torch.tensor([A])
    B = torch.randn(1, length, 1, dim, generator=generator)
    C = torch.randn(1, length, 1, dim, generator=generator)
    output, final_state = ssd_chunk(x, dt, A, B, C)
    assert torch.isfinite(output).all() and torch.isfinite(final_state).all()
    expected, expected_state, size, state_size = ssd_float64_long(x, dt, A, B, C)
    assert_close(output[0, :, 0], expected, size)
    assert_close(final_state[0, 0], expected_state, state_size)


def test_empty_sequence_returns_the_initial_state():
    x, dt, A, B, C, D, state = make_inputs(0, 2, 0, 2, 2, 3, 4, "uniform", True, True)
    for form in (ssd_recurrent, ssd_chunk):
        output, final_state = form(x, dt, A, B, C, D=D, initial_state=state)
        assert output.shape == (2, 0, 4, 3)
        assert torch.equal(final_state, state)


def _valid():
    x, dt, A, B, C, D, state = make_inputs(0, 2, 5, 2, 3, 4, 3, "uniform", True, True)
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=state)


def _call(form, **changes):
    arguments = {**_valid(), **changes}
    if form is ssd_step:
        token = {name: arguments[name][:, 0] for name in ("x", "dt", "B", "C")}
        return ssd_step(
            **token, A=arguments["A"], D=arguments["D"], state=arguments["initial_state"]
        )
    return form(**arguments)


@pytest.mark.parametrize("form", [ssd_recurrent, ssd_chunk, ssd_step])
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(dt=torch.rand(2, 4, 6)), r"^dt must have shape"),  # T of dt != T of x
        (
            dict(B=torch.randn(2, 5, 4, 3), C=torch.randn(2, 5, 4, 3)),  # H = 6, G = 4
            r"H = 6 .* must be divisible by the number of B/C groups G = 4",
        ),
        (dict(C=torch.randn(2, 5, 2, 2)), r"^C must have shape"),
        (dict(dt=-torch.rand(2, 5, 6)), r"^dt must be >= 0"),
        (dict(A=torch.full((6,), 0.5)), r"^A must be <= 0"),
        (dict(A=-torch.rand(5)), r"^A must have shape \(H,\)"),
        (dict(D=torch.randn(3)), r"^D must have shape \(H,\)"),
    ],
)
def test_invalid_inputs_raise_value_errors_naming_the_argument(form, changes, message):
    if form is ssd_step and set(changes) == {"dt"} and changes["dt"].shape[1] == 4:
        changes = dict(dt=torch.rand(2, 5, 5))  # no T in a step: mismatch H instead
    with pytest.raises(ValueError, match=message):
        _call(form, **changes)


@pytest.mark.parametrize("form", [ssd_recurrent, ssd_chunk])
def test_wrong_initial_state_shape_names_initial_state(form):
    # The argument is called `initial_state`; the message must say which argument was wrong.
    with pytest.raises(ValueError, match=r"^initial_state must have shape \(B, H, P, N\)"):
        _call(form, initial_state=torch.zeros(2, 6, 3, 4))


def test_wrong_step_state_shape_names_state():
    with pytest.raises(ValueError, match=r"^state must have shape \(B, H, P, N\)"):
        _call(ssd_step, initial_state=torch.zeros(2, 6, 3, 4))


@pytest.mark.parametrize("chunk_size", [0, -3, 2.0])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    with pytest.raises(ValueError, match=r"^chunk_size must be an int >= 1"):
        ssd_chunk(**_valid(), chunk_size=chunk_size)


@pytest.mark.parametrize("with_D", [True, False])
@pytest.mark.parametrize(("heads", "groups"), [(6, 2), (4, 4), (3, 1)])
def test_grouped_step_equals_step_with_repeated_x_and_B(heads, groups, with_D):
    generator = torch.Generator().manual_seed(heads * 10 + groups)
    batch, head_dim, state_dim = 2, 5, 3
    repeats = heads // groups

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    x, B, C = (
        rand(batch, groups, head_dim),
        rand(batch, groups, state_dim),
        rand(batch, heads, state_dim),
    )
    dt, A = rand(batch, heads).exp(), -rand(heads).exp()
    state, D = rand(batch, heads, head_dim, state_dim), rand(heads) if with_D else None
    want, want_state = ssd_step(
        x.repeat_interleave(repeats, 1), dt, A, B.repeat_interleave(repeats, 1), C, state, D=D
    )
    got, got_state = ssd_step_grouped(x, dt, A, B, C, state, D=D)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_state, want_state, rtol=1e-6, atol=1e-6)
