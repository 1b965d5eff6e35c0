"""GatedCrossAttention (paper 000 eq. 11-12): weight reuse from a real transformers Qwen2.5-VL
attention, exactly zero at init, a softmax reference written here with transformers' repeat_kv,
text-only queries, samples without scenes, decoding from cached scenes, bf16, gradients and
input errors. Tiny sizes: hidden 64, 4 heads, 2 kv heads, head_dim 16."""

import math

import pytest
import torch
from layer_teachers import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, teacher_attention, text_config
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm, repeat_kv

from linvid.layers.base import MixerContext
from linvid.layers.cross_attention import GatedCrossAttention


def cross_attention(seed=0, open_gate=False):
    """A real Qwen2.5-VL attention (biases redrawn so copying them is visible), an RMSNorm with
    a non-trivial weight standing in for the decoder layer's input_layernorm, and the
    cross-attention built from both; with open_gate, its gates are off their init."""
    attention = teacher_attention(seed, layer_idx=1, bias_std=0.1)
    norm = Qwen2_5_VLRMSNorm(HIDDEN, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    module = GatedCrossAttention.from_attention(attention, text_config(), norm)
    if open_gate:
        open_gates(module)
    return attention, norm, module


def open_gates(module, seed=1):
    """Static gate and dynamic-gate weights away from their init, so the branch is nonzero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        module.static_gate.fill_(0.7)
        module.dynamic_gate.weight.normal_(0.0, 0.2)


def batch_with_scenes(length=9, scenes=5):
    """Two samples: sample 0 has left padding (2) and vision tokens (positions 3-5) and all its
    scenes; sample 1 has no padding, vision tokens 0-3 and only 3 of its scenes real."""
    hidden = torch.randn(2, length, HIDDEN)
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[0, :2] = False
    vision = torch.zeros(2, length, dtype=torch.bool)
    vision[0, 3:6] = True
    vision[1, :4] = True
    scene_tokens = 3.0 * torch.randn(2, scenes, HIDDEN)  # un-normalised, as the context has them
    scene_mask = torch.ones(2, scenes, dtype=torch.bool)
    scene_mask[1, 3:] = False
    scene_tokens[1, 3:] = float("nan")  # padding scenes must not matter
    context = MixerContext(
        padding_mask=padding,
        vision_mask=vision,
        videos=[[], []],
        scene_tokens=scene_tokens,
        scene_mask=scene_mask,
    )
    return hidden, context


def reference_branch(attention, norm, module, hidden, context):
    """Eq. 11-12 token by token with the teacher's own projections and repeat_kv."""
    text = context.padding_mask & ~context.vision_mask
    output = torch.zeros_like(hidden)
    groups = HEADS // KV_HEADS
    for sample in range(hidden.shape[0]):
        real = context.scene_mask[sample]
        scenes = norm(context.scene_tokens[sample, real])  # (S_real, hidden)
        keys = attention.k_proj(scenes).view(-1, KV_HEADS, HEAD_DIM).transpose(0, 1)
        values = attention.v_proj(scenes).view(-1, KV_HEADS, HEAD_DIM).transpose(0, 1)
        keys = repeat_kv(keys[None], groups)[0]  # (H, S_real, head_dim)
        values = repeat_kv(values[None], groups)[0]
        for position in torch.nonzero(text[sample]).flatten().tolist():
            x = hidden[sample, position]
            query = attention.q_proj(x).view(HEADS, 1, HEAD_DIM)
            weights = torch.softmax(query @ keys.transpose(1, 2) / math.sqrt(HEAD_DIM), dim=-1)
            attended = (weights @ values).reshape(-1)
            gate = torch.tanh(module.dynamic_gate(x))
            output[sample, position] = attention.o_proj(attended) * gate * module.static_gate
    return output


def test_from_attention_copies_teacher_weights_and_holds_the_norm():
    attention, norm, module = cross_attention()
    pairs = (
        (module.query, attention.q_proj),
        (module.key, attention.k_proj),
        (module.value, attention.v_proj),
        (module.output, attention.o_proj),
    )
    for ours, theirs in pairs:
        assert torch.equal(ours.weight, theirs.weight)
        assert (ours.bias is None) == (theirs.bias is None)
        if theirs.bias is not None:
            assert torch.equal(ours.bias, theirs.bias)
    assert module.key.weight.shape == (KV_HEADS * HEAD_DIM, HIDDEN)  # grouped, not repeated
    assert module.norm is norm
    assert not any(name.startswith("norm") for name in module.state_dict())
    assert module.static_gate.item() == 0.0


def test_branch_is_exactly_zero_at_init():
    _, _, module = cross_attention()
    hidden, context = batch_with_scenes()
    with torch.no_grad():
        output, state = module(hidden, context)
    assert torch.count_nonzero(output) == 0
    assert state["scene_keys"].shape == (2, KV_HEADS, 5, HEAD_DIM)
    assert torch.equal(state["scene_mask"], context.scene_mask)


def test_branch_matches_reference_and_is_zero_off_text_tokens():
    attention, norm, module = cross_attention(open_gate=True)
    hidden, context = batch_with_scenes()
    with torch.no_grad():
        output, _ = module(hidden, context)
        expected = reference_branch(attention, norm, module, hidden, context)
    assert torch.allclose(output, expected, atol=1e-6)
    text = context.padding_mask & ~context.vision_mask
    assert torch.count_nonzero(output[~text]) == 0
    assert bool((output[text].abs().sum(-1) > 0).all())


def test_samples_without_scenes_get_zero_and_no_nan():
    _, _, module = cross_attention(open_gate=True)
    hidden, context = batch_with_scenes()
    context.scene_mask[1] = False
    output, _ = module(hidden, context)
    output.square().sum().backward()
    for name, parameter in module.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
    with torch.no_grad():
        nothing, empty_state = module(hidden, MixerContext.empty(2))
    assert torch.isfinite(output).all()
    assert torch.count_nonzero(output[1]) == 0
    assert torch.count_nonzero(output[0]) > 0
    assert torch.count_nonzero(nothing) == 0
    assert empty_state["scene_keys"].shape == (2, KV_HEADS, 0, HEAD_DIM)


def test_decoding_uses_the_scenes_cached_in_the_state():
    _, _, module = cross_attention(open_gate=True)
    hidden, context = batch_with_scenes(length=9)
    with torch.no_grad():
        full, _ = module(hidden, context)
        prefill_context = MixerContext(
            padding_mask=context.padding_mask[:, :6],
            vision_mask=context.vision_mask[:, :6],
            videos=[[], []],
            scene_tokens=context.scene_tokens,
            scene_mask=context.scene_mask,
        )
        outputs, state = [], None
        output, state = module(hidden[:, :6], prefill_context, state)
        outputs.append(output)
        for t in range(6, 9):  # decoding steps: no scenes in the context, only in the state
            output, state = module(hidden[:, t : t + 1], MixerContext.empty(2), state)
            outputs.append(output)
    assert torch.allclose(torch.cat(outputs, 1), full, atol=1e-6)
    assert torch.count_nonzero(full[:, 6:]) > 0


def test_static_gate_gets_a_gradient_at_init_and_opens_the_rest():
    _, _, module = cross_attention()
    hidden, context = batch_with_scenes()
    target = torch.randn_like(hidden)
    output, _ = module(hidden, context)
    (output - target).square().sum().backward()
    assert module.static_gate.grad.abs().item() > 0
    # With g_s = 0 nothing else can change the output yet.
    assert torch.count_nonzero(module.query.weight.grad) == 0
    module.zero_grad()
    with torch.no_grad():
        module.static_gate.fill_(0.5)
    output, _ = module(hidden, context)
    (output - target).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
        assert torch.count_nonzero(parameter.grad) > 0, name


def test_bf16_runs_and_stays_close_to_float32():
    attention, norm, module = cross_attention(open_gate=True)
    hidden, context = batch_with_scenes()
    with torch.no_grad():
        reference, _ = module(hidden, context)
        half = GatedCrossAttention.from_attention(
            attention.to(torch.bfloat16), text_config(), norm.to(torch.bfloat16)
        )
        open_gates(half)
        output, state = half(hidden.to(torch.bfloat16), context)
    assert output.dtype == torch.bfloat16 and state["scene_keys"].dtype == torch.bfloat16
    error = (output.float() - reference).norm() / reference.norm()
    assert error < 0.05


def test_bad_inputs_raise_value_errors_naming_the_argument():
    _, norm, module = cross_attention()
    hidden, context = batch_with_scenes()
    bad = MixerContext(scene_tokens=torch.randn(2, 5, HIDDEN + 1))
    with pytest.raises(ValueError, match="context.scene_tokens"):
        module(hidden, bad)
    bad = MixerContext(scene_tokens=context.scene_tokens, scene_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="context.scene_mask"):
        module(hidden, bad)
    with pytest.raises(ValueError, match="context.scene_mask"):
        module(hidden, MixerContext(scene_mask=context.scene_mask))
    with pytest.raises(ValueError, match="context.vision_mask"):
        module(hidden, MixerContext(vision_mask=torch.zeros(2, 3, dtype=torch.bool)))
    _, state = module(hidden, context)
    with pytest.raises(ValueError, match="state must be a dict with keys"):
        module(hidden, None, {"scene_keys": state["scene_keys"]})
    state["scene_values"] = state["scene_values"][:, :, :2]
    with pytest.raises(ValueError, match=r"state\['scene_values'\]"):
        module(hidden, None, state)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        GatedCrossAttention(HIDDEN, HEADS, 3, HEAD_DIM, norm)
    with pytest.raises(ValueError, match="norm"):
        GatedCrossAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, None)
