"""RWKV6TimeMix: weight reuse from a real transformers Qwen2.5-VL attention, the layer against a
float64 loop written here from the x060 equations, the mixer convention (one call == several
calls carrying the state == token by token; padding changes nothing), bf16, gradients and
input errors. Tiny sizes: hidden 64, 4 heads, 2 kv heads, head_dim 16."""

import functools

import pytest
import torch
from layer_teachers import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    teacher_attention,
    teacher_output,
    text_config,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import repeat_kv

from linvid.layers.base import MixerContext
from linvid.layers.rwkv6 import GATE_BIAS, GROUP_NORM_EPS, SHIFT_MIX_ORDER, RWKV6TimeMix

# Layer 2 of 4 (the depth of the decay spectrum), biases redrawn so that copying them is visible.
teacher = functools.partial(teacher_attention, layer_idx=2, bias_std=0.1)


def active_time_mix(seed=0):
    """A randomly initialised time mix whose data-dependent parts (zero at x060 init) are on."""
    torch.manual_seed(seed)
    module = RWKV6TimeMix(
        HIDDEN, HEADS, HEAD_DIM, projection_bias=True, layer_idx=1, num_layers=4
    ).eval()
    with torch.no_grad():
        for parameter in (module.shift_mix_down, module.decay_down, module.shift_mix_up):
            parameter.normal_(0.0, 0.3)
        module.decay_up.normal_(0.0, 0.3)
        module.bonus.normal_(0.0, 0.5)
        module.gate.bias.normal_(0.0, 0.5)
        module.output_norm.weight.normal_(1.0, 0.2)
        module.output_norm.bias.normal_(0.0, 0.2)
    return module


def reference_time_mix(module, x):
    """The x060 time mix one token at a time in float64, written from the equations (RWKV-LM
    RWKV_Tmix_x060 + its CUDA wkv6 kernel) with no code shared with the module."""
    p = {name: value.detach().double() for name, value in module.named_parameters()}
    x = x.double()
    batch, length, _ = x.shape
    rank = p["shift_mix_down"].shape[1] // 5
    previous = torch.zeros(batch, HIDDEN, dtype=torch.float64)
    state = torch.zeros(batch, HEADS, HEAD_DIM, HEAD_DIM, dtype=torch.float64)
    outputs = []
    for t in range(length):
        x_t = x[:, t]
        delta = previous - x_t
        low = torch.tanh((x_t + delta * p["shift_mix_x"]) @ p["shift_mix_down"])
        mixed = {}
        for i, name in enumerate(SHIFT_MIX_ORDER):
            offset = low[:, i * rank : (i + 1) * rank] @ p["shift_mix_up"][i]
            mixed[name] = x_t + delta * (p["shift_mix"][i] + offset)

        def linear(name, value):
            out = value @ p[f"{name}.weight"].T
            return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

        decay_logits = (
            p["decay_base"] + torch.tanh(mixed["decay"] @ p["decay_down"]) @ p["decay_up"]
        )
        w = -torch.exp(decay_logits).view(batch, HEADS, HEAD_DIM)
        r = linear("receptance", mixed["receptance"]).view(batch, HEADS, HEAD_DIM)
        k = linear("key", mixed["key"]).view(batch, HEADS, HEAD_DIM)
        v = linear("value", mixed["value"]).view(batch, HEADS, HEAD_DIM)
        g = torch.nn.functional.silu(linear("gate", mixed["gate"]))
        kv = k[..., :, None] * v[..., None, :]
        o = torch.einsum("bhk,bhkv->bhv", r, state + p["bonus"][..., None] * kv)
        state = torch.exp(w)[..., None] * state + kv
        mean = o.mean(-1, keepdim=True)
        variance = o.var(-1, unbiased=False, keepdim=True)
        normed = ((o - mean) / torch.sqrt(variance + GROUP_NORM_EPS)).reshape(batch, -1)
        normed = normed * p["output_norm.weight"] + p["output_norm.bias"]
        outputs.append(linear("output", normed * g))
        previous = x_t
    return torch.stack(outputs, 1), state


def run_in_calls(module, x, sizes, context_for=None):
    """Run x through `module` in consecutive calls of `sizes` tokens, carrying the state."""
    outputs, state, start = [], None, 0
    for size in sizes:
        piece = x[:, start : start + size]
        context = (
            MixerContext.empty(x.shape[0]) if context_for is None else context_for(start, size)
        )
        output, state = module(piece, context, state)
        outputs.append(output)
        start += size
    assert start == x.shape[1]
    return torch.cat(outputs, 1), state


def test_from_attention_maps_teacher_weights_head_by_head():
    attention = teacher()
    module = RWKV6TimeMix.from_attention(attention, text_config())
    assert torch.equal(module.receptance.weight, attention.q_proj.weight)
    assert torch.equal(module.receptance.bias, attention.q_proj.bias)
    assert torch.equal(module.output.weight, attention.o_proj.weight)
    assert module.output.bias is None and attention.o_proj.bias is None
    groups = HEADS // KV_HEADS
    for ours, theirs in ((module.key, attention.k_proj), (module.value, attention.v_proj)):
        assert ours.weight.shape == (HEADS * HEAD_DIM, HIDDEN)
        for head in range(HEADS):
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            kv_rows = slice((head // groups) * HEAD_DIM, (head // groups + 1) * HEAD_DIM)
            assert torch.equal(ours.weight[rows], theirs.weight[kv_rows])
            assert torch.equal(ours.bias[rows], theirs.bias[kv_rows])
    # The same head layout as the teacher's own repeat_kv on its key states.
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        teacher_keys = attention.k_proj(x).view(2, 5, KV_HEADS, HEAD_DIM).transpose(1, 2)
        repeated = repeat_kv(teacher_keys, groups).transpose(1, 2).reshape(2, 5, -1)
        assert torch.allclose(module.key(x), repeated, atol=1e-6)


def test_from_attention_inits_the_parts_without_a_teacher_counterpart():
    attention = teacher()
    module = RWKV6TimeMix.from_attention(attention, text_config())
    assert torch.count_nonzero(module.shift_mix) == 0
    assert torch.count_nonzero(module.shift_mix_x) == 0
    assert torch.count_nonzero(module.shift_mix_down) == 0
    assert torch.all(module.bonus == 1.0)
    x = torch.randn(3, 7, HIDDEN)
    with torch.no_grad():
        gate = torch.nn.functional.silu(module.gate(x))
    assert torch.allclose(gate, torch.ones_like(gate), atol=1e-6)
    assert module.gate.bias[0].item() == pytest.approx(GATE_BIAS)
    # GroupNorm weight: root-mean-square of each head's teacher value channels.
    value = attention.v_proj.weight.detach().view(KV_HEADS, HEAD_DIM, HIDDEN)
    bias = attention.v_proj.bias.detach().view(KV_HEADS, HEAD_DIM)
    for head in range(HEADS):
        kv = head // (HEADS // KV_HEADS)
        expected = ((value[kv].square().sum() + bias[kv].square().sum()) / HEAD_DIM).sqrt()
        weights = module.output_norm.weight[head * HEAD_DIM : (head + 1) * HEAD_DIM]
        assert torch.allclose(weights, expected.expand(HEAD_DIM), rtol=1e-5)
    assert torch.count_nonzero(module.output_norm.bias) == 0
    # Decays: BlinkDL's spectrum for layer 2 of 4, every log decay in [-exp(-1), -exp(-6)].
    log_decay = -torch.exp(module.decay_base)
    assert module.decay_base.min().item() == pytest.approx(-6.0)
    assert module.decay_base.max().item() == pytest.approx(-1.0)
    assert torch.all(log_decay < 0)


def test_random_init_follows_x060_scheme():
    module = RWKV6TimeMix(HIDDEN, HEADS, HEAD_DIM, layer_idx=0, num_layers=4)
    # Layer 0: mix = 1 - (i / D)^1, decay from -6 to -1 with exponent 0.7, bonus = zigzag.
    channel = torch.arange(HIDDEN) / HIDDEN
    assert torch.allclose(module.shift_mix_x, 1.0 - channel)
    assert torch.allclose(module.shift_mix[SHIFT_MIX_ORDER.index("value")], 1.0 - channel)
    assert torch.allclose(module.shift_mix[SHIFT_MIX_ORDER.index("receptance")], 1.0 - channel**0.5)
    position = torch.arange(HEADS * HEAD_DIM) / (HEADS * HEAD_DIM - 1)
    assert torch.allclose(module.decay_base, -6.0 + 5.0 * position**0.7)
    zigzag = ((torch.arange(HEADS * HEAD_DIM) + 1) % 3 - 1) * 0.1
    assert torch.allclose(module.bonus.flatten(), zigzag)
    assert torch.count_nonzero(module.decay_down) == 0
    assert 0 < module.decay_up.abs().max() <= 0.01
    assert module.receptance.bias is None


def test_forward_matches_float64_reference_of_the_equations():
    module = active_time_mix()
    x = torch.randn(2, 19, HIDDEN)
    with torch.no_grad():
        output, state = module(x)
    expected, expected_state = reference_time_mix(module, x)
    assert torch.allclose(output.double(), expected, atol=2e-5, rtol=1e-4)
    assert torch.allclose(state["wkv"].double(), expected_state, atol=2e-5, rtol=1e-4)
    assert torch.equal(state["shift"], x[:, -1])


@pytest.mark.parametrize("sizes", [(23,), (7, 1, 9, 1, 5), (1,) * 23, (16, 1, 1, 1, 1, 1, 1, 1)])
def test_one_call_equals_calls_carrying_the_state(sizes):
    module = active_time_mix()
    x = torch.randn(2, 23, HIDDEN)
    with torch.no_grad():
        full, full_state = module(x)
        pieces, state = run_in_calls(module, x, sizes)
    assert torch.allclose(pieces, full, atol=1e-5, rtol=1e-5)
    assert torch.allclose(state["wkv"], full_state["wkv"], atol=1e-5, rtol=1e-5)
    assert torch.equal(state["shift"], full_state["shift"])
    assert state["wkv"].dtype == torch.float32 and state["shift"].dtype == torch.float32


def test_left_padding_does_not_change_real_tokens():
    module = RWKV6TimeMix.from_attention(teacher(), text_config())
    with torch.no_grad():  # turn the token shift on so that padding could leak through it
        module.shift_mix.normal_(0.0, 0.5)
    lengths = (12, 7)
    sequences = [torch.randn(1, length, HIDDEN) for length in lengths]
    longest = max(lengths)
    padded = torch.full((2, longest, HIDDEN), float("nan"))  # padding that must not matter
    padding_mask = torch.zeros(2, longest, dtype=torch.bool)
    for row, (sequence, length) in enumerate(zip(sequences, lengths, strict=True)):
        padded[row, longest - length :] = sequence[0]
        padding_mask[row, longest - length :] = True
    context = MixerContext(padding_mask=padding_mask, videos=[[], []])
    continuation = torch.randn(2, 3, HIDDEN)
    with torch.no_grad():
        batched, batched_state = module(padded, context)
        steps = [batched_state]
        for t in range(3):
            output, state = module(continuation[:, t : t + 1], None, steps[-1])
            steps.append(state)
            batched = torch.cat((batched, output), 1)
        for row, (sequence, length) in enumerate(zip(sequences, lengths, strict=True)):
            alone, alone_state = module(torch.cat((sequence, continuation[row : row + 1]), 1))
            assert torch.allclose(batched[row, longest - length :], alone[0], atol=1e-5)
            assert torch.isfinite(batched[row]).all()
            for key in ("shift", "wkv"):
                assert torch.allclose(steps[-1][key][row], alone_state[key][0], atol=1e-5)


def test_padding_after_a_state_is_skipped_by_shift_and_decay():
    module = active_time_mix()
    x = torch.randn(1, 10, HIDDEN)
    with torch.no_grad():
        full, _ = module(x)
        first, state = module(x[:, :6])
        # The second call holds 3 padding tokens before the last 4 real ones.
        second = torch.cat((torch.full((1, 3, HIDDEN), float("nan")), x[:, 6:]), 1)
        mask = torch.tensor([[False] * 3 + [True] * 4])
        output, _ = module(second, MixerContext(padding_mask=mask, videos=[[]]), state)
    assert torch.allclose(output[:, 3:], full[:, 6:], atol=1e-5)
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("bias_std", [None, 1.0])
def test_output_scale_at_init_is_the_teachers(bias_std):
    """Random unit-variance inputs, 16 tokens; bias_std None keeps nn.Linear's default biases
    (weight-dominated values), 1.0 makes value biases dominate as in trained Qwen models."""
    ratios = []
    for layer_idx in range(4):
        attention = teacher_attention(seed=layer_idx, layer_idx=layer_idx, bias_std=bias_std)
        module = RWKV6TimeMix.from_attention(attention, text_config())
        x = torch.randn(4, 16, HIDDEN)
        with torch.no_grad():
            ours, _ = module(x)
            theirs = teacher_output(attention, x, rotary=False)
        assert torch.isfinite(ours).all()
        ratios.append(ours.std().item() / theirs.std().item())
    assert all(1 / 3 < ratio < 3 for ratio in ratios), ratios


def test_bf16_runs_and_stays_close_to_float32():
    attention = teacher()
    module = RWKV6TimeMix.from_attention(attention, text_config())
    x = torch.randn(2, 20, HIDDEN)
    with torch.no_grad():
        reference, _ = module(x)
        half_module = RWKV6TimeMix.from_attention(attention.to(torch.bfloat16), text_config())
        assert half_module.receptance.weight.dtype == torch.bfloat16
        output, state = half_module(x.to(torch.bfloat16))
        step, step_state = half_module(x[:, :1].to(torch.bfloat16), None, state)
    assert output.dtype == torch.bfloat16 and step.dtype == torch.bfloat16
    assert state["wkv"].dtype == torch.float32 and step_state["wkv"].dtype == torch.float32
    error = (output.float() - reference).norm() / reference.norm()
    assert error < 0.05


def test_gradients_reach_every_new_parameter_within_two_steps():
    module = RWKV6TimeMix.from_attention(teacher(), text_config())
    x = torch.randn(2, 12, HIDDEN)
    target = torch.randn(2, 12, HIDDEN)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    # x060's zero down-projections make tanh(x @ 0) = 0: the up-projections and shift_mix_x
    # (whose path runs through a down-projection) get gradients from the second step on.
    zero_at_first = {"shift_mix_up", "decay_up", "shift_mix_x"}
    for step in range(2):
        optimizer.zero_grad()
        output, _ = module(x)
        (output - target).square().mean().backward()
        for name, parameter in module.named_parameters():
            assert torch.isfinite(parameter.grad).all(), name
            nonzero = bool(torch.count_nonzero(parameter.grad))
            assert nonzero == (step == 1 or name not in zero_at_first), (step, name)
        optimizer.step()


def test_bad_inputs_raise_value_errors_naming_the_argument():
    module = RWKV6TimeMix(HIDDEN, HEADS, HEAD_DIM)
    x = torch.randn(2, 5, HIDDEN)
    with pytest.raises(ValueError, match="hidden_states"):
        module(torch.randn(2, 5, HIDDEN + 1))
    with pytest.raises(ValueError, match="hidden_states"):
        module(torch.randn(2, 0, HIDDEN))
    with pytest.raises(ValueError, match="context.padding_mask"):
        module(x, MixerContext(padding_mask=torch.ones(2, 5)))
    with pytest.raises(ValueError, match="context.padding_mask"):
        module(x, MixerContext(padding_mask=torch.ones(2, 4, dtype=torch.bool)))
    _, state = module(x)
    with pytest.raises(ValueError, match="state must be a dict with keys"):
        module(x, None, {"wkv": state["wkv"]})
    with pytest.raises(ValueError, match=r"state\['wkv'\]"):
        module(x, None, {"shift": state["shift"], "wkv": state["wkv"][:, :2]})
    with pytest.raises(ValueError, match="layer_idx"):
        RWKV6TimeMix(HIDDEN, HEADS, HEAD_DIM, layer_idx=4, num_layers=4)
    with pytest.raises(ValueError, match="head_dim"):
        RWKV6TimeMix(HIDDEN, HEADS, 0)
    config = text_config()
    config.head_dim = 8  # no longer the teacher's layout
    with pytest.raises(ValueError, match="attention.q_proj.weight"):
        RWKV6TimeMix.from_attention(teacher(), config)
