"""Mamba2Mixer (linvid/layers/mamba2.py): the layer against a float64 per-token loop written
here from its equations, MambaInLlama's weight mapping from a real Qwen2_5_VLAttention, state
carrying (prefill == chunks == token-by-token decoding), padding, dtype and input checks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from layer_teachers import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    teacher_attention,
    teacher_output,
    text_config,
)

from linvid.layers.base import MixerContext
from linvid.layers.mamba2 import SILU_FIXED_POINT, Mamba2Mixer


def random_mixer(seed: int = 0, **options) -> Mamba2Mixer:
    """A plain-constructor mixer with GQA, biases and random z/conv (nothing at identity)."""
    torch.manual_seed(seed)
    mixer = Mamba2Mixer(
        HIDDEN, HEADS, HEAD_DIM, num_key_value_heads=KV_HEADS, projection_bias=True, **options
    )
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
    return mixer


def reference_forward(mixer: Mamba2Mixer, hidden: torch.Tensor) -> torch.Tensor:
    """The module docstring's equations one token at a time in float64: causal conv as a sum
    over taps, SiLU, GQA by head h reading kv head h // (H / H_kv), the SSD recurrence, D skip,
    RMSNorm(y * silu(z)) per head, output projection."""
    parameters = {name: value.double() for name, value in mixer.state_dict().items()}
    hidden = hidden.double()
    batch, length, _ = hidden.shape

    def linear(name):
        bias = parameters.get(f"{name}.bias")
        return hidden @ parameters[f"{name}.weight"].T + (0 if bias is None else bias)

    inputs = torch.cat((linear("x_proj"), linear("b_proj"), linear("c_proj")), dim=-1)
    taps = parameters["scan.conv.weight"][:, 0]  # (channels, kernel), last = newest
    kernel = taps.shape[1]
    convolved = parameters["scan.conv.bias"].expand(batch, length, -1).clone()
    for t in range(length):
        for tap in range(kernel):
            source = t - (kernel - 1 - tap)
            if source >= 0:
                convolved[:, t] += taps[:, tap] * inputs[:, source]
    x, B, C = F.silu(convolved).split(
        (KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, HEADS * HEAD_DIM), -1
    )
    kv_head = [head // (HEADS // KV_HEADS) for head in range(HEADS)]
    x = x.unflatten(-1, (KV_HEADS, HEAD_DIM))[:, :, kv_head]
    B = B.unflatten(-1, (KV_HEADS, HEAD_DIM))[:, :, kv_head]
    C = C.unflatten(-1, (HEADS, HEAD_DIM))
    dt = F.softplus(hidden @ parameters["scan.dt_proj.weight"].T + parameters["scan.dt_bias"])
    A = -torch.exp(parameters["scan.A_log"])
    state = torch.zeros(batch, HEADS, HEAD_DIM, HEAD_DIM, dtype=torch.float64)
    outputs = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + dt[:, t, :, None, None] * x[:, t, ..., None] * B[:, t, :, None]
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + parameters["scan.D"][:, None] * x[:, t]
        outputs.append(y)
    y = torch.stack(outputs, dim=1) * F.silu(linear("z_proj")).unflatten(-1, (HEADS, HEAD_DIM))
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + mixer.norm.eps)
    y = y.flatten(2) * parameters["norm.weight"]
    return y @ parameters["out_proj.weight"].T


def test_forward_matches_float64_reference():
    mixer = random_mixer(chunk_size=4)
    hidden = torch.randn(2, 11, HIDDEN)
    output, _ = mixer(hidden, MixerContext.empty(2))
    expected = reference_forward(mixer, hidden)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)


def test_from_attention_maps_teacher_weights_tensor_by_tensor():
    attention = teacher_attention()
    mixer = Mamba2Mixer.from_attention(attention, text_config())
    pairs = (
        (mixer.c_proj, attention.q_proj),
        (mixer.b_proj, attention.k_proj),
        (mixer.x_proj, attention.v_proj),
    )
    for target, source in pairs:
        assert torch.equal(target.weight, source.weight)
        assert torch.equal(target.bias, source.bias)
    assert mixer.b_proj.weight.shape == (KV_HEADS * HEAD_DIM, HIDDEN)  # x, B stay at kv width
    assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
    assert mixer.out_proj.bias is None and attention.o_proj.bias is None
    assert (mixer.scan.num_heads, mixer.scan.head_dim, mixer.scan.state_size) == (4, 16, 16)

    # Gate z at identity: weight 0, silu(bias) = 1.
    assert torch.equal(mixer.z_proj.weight, torch.zeros_like(mixer.z_proj.weight))
    torch.testing.assert_close(F.silu(mixer.z_proj.bias), torch.ones(HEADS * HEAD_DIM))
    assert mixer.z_proj.bias[0].item() == pytest.approx(SILU_FIXED_POINT)

    # Norm weight: the value scale of the kv head each query head reads.
    value = attention.v_proj
    for head in range(HEADS):
        rows = slice(head // 2 * HEAD_DIM, (head // 2 + 1) * HEAD_DIM)
        square = value.weight[rows].square().sum() + value.bias[rows].square().sum()
        expected = (square / HEAD_DIM).sqrt()
        norm_weight = mixer.norm.weight[head * HEAD_DIM : (head + 1) * HEAD_DIM]
        torch.testing.assert_close(norm_weight, expected.expand(HEAD_DIM))

    # Mamba-2 standard inits.
    A = -torch.exp(mixer.scan.A_log)
    assert bool(((A <= -1) & (A >= -16)).all())
    dt = F.softplus(mixer.scan.dt_bias)
    assert bool(((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5))).all())
    assert torch.equal(mixer.scan.D, torch.ones(HEADS))


def test_conv_starts_as_identity_tap():
    attention = teacher_attention()
    mixer = Mamba2Mixer.from_attention(attention, text_config())
    weight = mixer.scan.conv.weight[:, 0]
    assert torch.equal(weight[:, -1], torch.ones(weight.shape[0]))
    assert torch.equal(weight[:, :-1], torch.zeros(weight.shape[0], weight.shape[1] - 1))
    assert torch.equal(mixer.scan.conv.bias, torch.zeros_like(mixer.scan.conv.bias))
    # The conv state holds the raw projections [x, B, C] = [W_V h, W_K h, W_Q h] of the last
    # kernel - 1 = 3 tokens.
    hidden = torch.randn(1, 6, HIDDEN)
    _, state = mixer(hidden, MixerContext.empty(1))
    projections = torch.cat(
        (attention.v_proj(hidden), attention.k_proj(hidden), attention.q_proj(hidden)), dim=-1
    )
    torch.testing.assert_close(state["conv"], projections[:, -3:].transpose(1, 2))


def test_grouped_query_heads_read_kv_head_h_over_group_size():
    """Query heads 2h and 2h+1 read kv head h (repeat_kv), for both x and B."""
    mixer = Mamba2Mixer.from_attention(teacher_attention(), text_config())
    hidden = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        mixer.scan.D.zero_()  # y is then the SSD term only: zero when x or B is zero
        mixer.scan.dt_bias.fill_(0.0)
    for projection in ("x_proj", "b_proj"):
        for kv_head, own_columns, other_columns in (
            (1, slice(32, 64), slice(0, 32)),
            (0, slice(0, 32), slice(32, 64)),
        ):
            probe = copy.deepcopy(mixer)
            rows = slice(kv_head * HEAD_DIM, (kv_head + 1) * HEAD_DIM)
            with torch.no_grad():
                getattr(probe, projection).weight[rows] = 0.0
                getattr(probe, projection).bias[rows] = 0.0
            before, _ = probe(hidden, MixerContext.empty(2))
            with torch.no_grad():
                probe.out_proj.weight[:, own_columns] += torch.randn(HIDDEN, 32)
            unchanged, _ = probe(hidden, MixerContext.empty(2))
            torch.testing.assert_close(unchanged, before, rtol=0, atol=1e-6)
            with torch.no_grad():
                probe.out_proj.weight[:, other_columns] += torch.randn(HIDDEN, 32)
            changed, _ = probe(hidden, MixerContext.empty(2))
            assert (changed - before).abs().max() > 1e-2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_at_init_is_on_the_teacher_scale(seed):
    attention = teacher_attention(seed)
    mixer = Mamba2Mixer.from_attention(attention, text_config())
    hidden = torch.randn(2, 24, HIDDEN)
    with torch.no_grad():
        expected = teacher_output(attention, hidden)
        output, _ = mixer(hidden, MixerContext.empty(2))
    assert bool(output.isfinite().all())
    ratio = output.std() / expected.std()
    assert 1 / 3 < ratio < 3, f"student/teacher output std ratio {ratio:.3f}"


@pytest.mark.parametrize("build, conv_kernel", [("random", 4), ("random", 1), ("teacher", 4)])
def test_prefill_in_chunks_and_decoding_equal_one_forward(build, conv_kernel):
    if build == "random":
        mixer = random_mixer(chunk_size=4, conv_kernel=conv_kernel)
    else:
        mixer = Mamba2Mixer.from_attention(teacher_attention(), text_config(), chunk_size=4)
    hidden = torch.randn(2, 13, HIDDEN)
    context = MixerContext.empty(2)
    full, full_state = mixer(hidden, context)

    outputs, state = [], None
    for start, stop in ((0, 5), (5, 6), (6, 10), (10, 13)):
        output, state = mixer(hidden[:, start:stop], context, state)
        outputs.append(output)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-5, atol=1e-5)
    for key in ("conv", "ssm"):
        torch.testing.assert_close(state[key], full_state[key], rtol=1e-5, atol=1e-5)

    outputs, state = [], None
    output, state = mixer(hidden[:, :6], context)
    outputs.append(output)
    for t in range(6, 13):
        output, state = mixer(hidden[:, t : t + 1], context, state)
        outputs.append(output)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-5, atol=1e-5)
    assert state["ssm"].dtype == torch.float32 and state["conv"].dtype == torch.float32


def test_left_padding_does_not_change_real_tokens():
    mixer = random_mixer(chunk_size=4)
    real = torch.randn(1, 10, HIDDEN)
    padded = torch.cat((100 * torch.randn(1, 3, HIDDEN), real), dim=1)
    batch = torch.cat((padded, torch.randn(1, 13, HIDDEN)), dim=0)
    padding_mask = torch.ones(2, 13, dtype=torch.bool)
    padding_mask[0, :3] = False
    output, state = mixer(batch, MixerContext(padding_mask=padding_mask, videos=[[], []]))
    alone, alone_state = mixer(real, MixerContext.empty(1))
    torch.testing.assert_close(output[:1, 3:], alone, rtol=1e-5, atol=1e-5)
    for key in ("conv", "ssm"):
        torch.testing.assert_close(state[key][:1], alone_state[key], rtol=1e-5, atol=1e-5)

    step = torch.randn(2, 1, HIDDEN)
    next_output, _ = mixer(step, MixerContext.empty(2), state)
    alone_next, _ = mixer(step[:1], MixerContext.empty(1), alone_state)
    torch.testing.assert_close(next_output[:1], alone_next, rtol=1e-5, atol=1e-5)


def test_bfloat16_runs_with_float32_state():
    mixer = Mamba2Mixer.from_attention(teacher_attention(), text_config())
    hidden = torch.randn(2, 12, HIDDEN)
    expected, _ = mixer(hidden, MixerContext.empty(2))
    mixer = mixer.to(torch.bfloat16)
    output, state = mixer(hidden.bfloat16(), MixerContext.empty(2))
    step, state = mixer(hidden[:, :1].bfloat16(), MixerContext.empty(2), state)
    assert output.dtype == torch.bfloat16 and step.dtype == torch.bfloat16
    assert state["conv"].dtype == torch.float32 and state["ssm"].dtype == torch.float32
    assert bool(output.isfinite().all())
    relative = (output.float() - expected).norm() / expected.norm()
    assert relative < 0.05


def test_gradients_reach_every_parameter():
    mixer = Mamba2Mixer.from_attention(teacher_attention(), text_config())
    hidden = torch.randn(2, 9, HIDDEN, requires_grad=True)
    output, _ = mixer(hidden, MixerContext.empty(2))
    output.square().mean().backward()
    for name, parameter in mixer.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().max() > 0, name
    assert hidden.grad.abs().max() > 0


def test_bad_inputs_raise_value_errors_naming_the_argument():
    mixer = random_mixer()
    hidden = torch.randn(2, 5, HIDDEN)
    _, state = mixer(hidden, MixerContext.empty(2))
    with pytest.raises(ValueError, match="hidden_states"):
        mixer(torch.randn(2, 5, HIDDEN + 1), MixerContext.empty(2))
    with pytest.raises(ValueError, match="hidden_states"):
        mixer(torch.randn(2, 0, HIDDEN), MixerContext.empty(2))
    with pytest.raises(ValueError, match="context.padding_mask"):
        mixer(hidden, MixerContext(padding_mask=torch.ones(2, 5)))
    with pytest.raises(ValueError, match="context.padding_mask"):
        mixer(hidden, MixerContext(padding_mask=torch.ones(2, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="state"):
        mixer(hidden, MixerContext.empty(2), {"ssm": state["ssm"]})
    with pytest.raises(ValueError, match=r"state\['conv'\]"):
        mixer(hidden, MixerContext.empty(2), {"conv": state["conv"][:, :, :2], "ssm": state["ssm"]})
    with pytest.raises(ValueError, match=r"state\['ssm'\]"):
        mixer(hidden[:1], MixerContext.empty(1), {"conv": state["conv"][:1], "ssm": state["ssm"]})
    with pytest.raises(ValueError, match="attention.q_proj"):
        Mamba2Mixer.from_attention(teacher_attention(), text_config(hidden_size=32))
    with pytest.raises(ValueError, match="attention.k_proj"):
        Mamba2Mixer.from_attention(teacher_attention(), text_config(num_heads=8))
    with pytest.raises(ValueError, match="attention.q_proj must be an nn.Linear"):
        Mamba2Mixer.from_attention(torch.nn.Module(), text_config())
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Mamba2Mixer.from_attention(teacher_attention(), text_config(num_key_value_heads=3))
    with pytest.raises(ValueError, match="num_heads"):
        Mamba2Mixer(HIDDEN, 4, HEAD_DIM, num_key_value_heads=3)
    with pytest.raises(ValueError, match="conv_kernel"):
        Mamba2Mixer(HIDDEN, 4, HEAD_DIM, conv_kernel=0)


def test_masked_token_reads_the_state_with_its_own_query_and_writes_nothing():
    """Mamba2Scan with write_mask False at the last token: y = C . state of the tokens before,
    where C is the conv over the earlier tokens' inputs and this token's own input; the SSD and
    conv states are those of the tokens before (the masked input enters the conv state as 0)."""
    torch.manual_seed(0)
    scan = random_mixer().scan
    hidden = torch.randn(2, 5, HIDDEN)
    inputs = torch.randn(2, 5, scan.conv_channels)
    write_mask = torch.ones(2, 5, dtype=torch.bool)
    write_mask[:, -1] = False
    y, state = scan(hidden, inputs, None, write_mask)
    _, before = scan(hidden[:, :4], inputs[:, :4])
    torch.testing.assert_close(state["ssm"], before["ssm"], rtol=0, atol=0)
    expected_conv = torch.cat((before["conv"][..., 1:], torch.zeros(2, scan.conv_channels, 1)), -1)
    torch.testing.assert_close(state["conv"], expected_conv, rtol=0, atol=0)

    window = torch.cat((before["conv"], inputs[:, 4:].transpose(1, 2)), dim=-1)
    own_query = F.silu(
        F.conv1d(window, scan.conv.weight, scan.conv.bias, groups=scan.conv_channels)
    )
    C = own_query[:, -HEADS * HEAD_DIM :, 0].unflatten(-1, (HEADS, HEAD_DIM))
    expected = torch.einsum("bhpn,bhn->bhp", before["ssm"], C)
    torch.testing.assert_close(y[:, -1], expected, rtol=1e-5, atol=1e-6)
