"""HybridRWKVMixer (paper 000 Fig. 1): both branches built from one real transformers
Qwen2.5-VL attention, the time mix alone at init, the mixer convention with scenes (one call ==
several calls carrying the state == token by token decoding from cached scenes; padding changes
nothing), bf16, gradients and state errors. Tiny sizes: hidden 64, 4 heads, 2 kv heads,
head_dim 16."""

import pytest
import torch
from layer_teachers import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, teacher_attention, text_config
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from linvid.layers.base import MixerContext
from linvid.layers.cross_attention import GatedCrossAttention
from linvid.layers.hybrid_rwkv import HybridRWKVMixer
from linvid.layers.rwkv6 import RWKV6TimeMix

STATE_KEYS = {
    "time_mix.shift",
    "time_mix.wkv",
    "cross_attention.scene_keys",
    "cross_attention.scene_values",
    "cross_attention.scene_mask",
}


def hybrid(seed=0, open_gate=True):
    """A hybrid mixer from a real Qwen2.5-VL attention; with open_gate, g_s and the token shift
    are moved off their init so both branches and the shift state matter."""
    attention = teacher_attention(seed, layer_idx=3, bias_std=0.1)
    norm = Qwen2_5_VLRMSNorm(HIDDEN, eps=1e-6)
    mixer = HybridRWKVMixer.from_attention(attention, text_config(), norm)
    if open_gate:
        with torch.no_grad():
            mixer.cross_attention.static_gate.fill_(0.8)
            mixer.cross_attention.dynamic_gate.weight.normal_(0.0, 0.2)
            mixer.time_mix.shift_mix.normal_(0.0, 0.5)
            mixer.time_mix.shift_mix_down.normal_(0.0, 0.1)
    return attention, norm, mixer


def video_sample(length=14, scenes=6):
    """One sample: text 0-2, vision 3-9, text 10-13; scenes of its video."""
    hidden = torch.randn(1, length, HIDDEN)
    vision = torch.zeros(1, length, dtype=torch.bool)
    vision[0, 3:10] = True
    return hidden, vision, 2.0 * torch.randn(1, scenes, HIDDEN)


def context_for(vision, scene_tokens, start, size, padding=None):
    """The context of tokens start..start+size: scenes only with the call that starts the
    sequence (later calls read them from the state), as a model adapter passes them."""
    first = start == 0
    return MixerContext(
        padding_mask=None if padding is None else padding[:, start : start + size],
        vision_mask=vision[:, start : start + size],
        videos=[[] for _ in range(vision.shape[0])],
        scene_tokens=scene_tokens if first else None,
    )


def test_from_attention_builds_both_branches_from_one_teacher():
    attention, norm, mixer = hybrid(open_gate=False)
    assert torch.equal(mixer.time_mix.receptance.weight, attention.q_proj.weight)
    assert torch.equal(mixer.cross_attention.query.weight, attention.q_proj.weight)
    assert torch.equal(mixer.cross_attention.value.bias, attention.v_proj.bias)
    # Separate output projections: equal values, distinct parameters.
    assert torch.equal(mixer.time_mix.output.weight, attention.o_proj.weight)
    assert torch.equal(mixer.cross_attention.output.weight, attention.o_proj.weight)
    assert mixer.time_mix.output.weight is not mixer.cross_attention.output.weight
    assert mixer.cross_attention.norm is norm
    assert not any(
        "norm.weight" in name and "output_norm" not in name for name in mixer.state_dict()
    )
    assert set(mixer.state_keys) == STATE_KEYS


def test_at_init_the_mixer_is_the_time_mix_alone():
    _, _, mixer = hybrid(open_gate=False)
    hidden, vision, scenes = video_sample()
    context = context_for(vision, scenes, 0, hidden.shape[1])
    with torch.no_grad():
        output, state = mixer(hidden, context)
        alone, _ = mixer.time_mix(hidden, context)
    assert torch.equal(output, alone)
    assert set(state) == STATE_KEYS
    assert state["cross_attention.scene_keys"].shape == (1, KV_HEADS, 6, HEAD_DIM)


@pytest.mark.parametrize("sizes", [(5, 6, 3), (11, 1, 1, 1), (1,) * 14])
def test_one_call_equals_calls_carrying_the_state(sizes):
    _, _, mixer = hybrid()
    hidden, vision, scenes = video_sample()
    with torch.no_grad():
        full, full_state = mixer(hidden, context_for(vision, scenes, 0, hidden.shape[1]))
        outputs, state, start = [], None, 0
        for size in sizes:
            context = context_for(vision, scenes, start, size)
            output, state = mixer(hidden[:, start : start + size], context, state)
            outputs.append(output)
            start += size
    assert torch.allclose(torch.cat(outputs, 1), full, atol=1e-5)
    for key in STATE_KEYS:
        assert torch.allclose(state[key].float(), full_state[key].float(), atol=1e-5), key
    # The cross-attention branch is on: the text tokens differ from the time mix alone.
    with torch.no_grad():
        alone, _ = mixer.time_mix(hidden)
    assert not torch.allclose(full[0, 10:], alone[0, 10:], atol=1e-3)


def test_left_padding_does_not_change_real_tokens():
    _, _, mixer = hybrid()
    samples = [video_sample(length=14, scenes=6), video_sample(length=10, scenes=4)]
    longest, most_scenes = 14, 6
    hidden = torch.full((2, longest, HIDDEN), float("nan"))
    vision = torch.zeros(2, longest, dtype=torch.bool)
    padding = torch.zeros(2, longest, dtype=torch.bool)
    scene_tokens = torch.zeros(2, most_scenes, HIDDEN)
    scene_mask = torch.zeros(2, most_scenes, dtype=torch.bool)
    for row, (sample_hidden, sample_vision, sample_scenes) in enumerate(samples):
        length, count = sample_hidden.shape[1], sample_scenes.shape[1]
        hidden[row, longest - length :] = sample_hidden[0]
        vision[row, longest - length :] = sample_vision[0]
        padding[row, longest - length :] = True
        scene_tokens[row, :count] = sample_scenes[0]
        scene_mask[row, :count] = True
    context = MixerContext(
        padding_mask=padding,
        vision_mask=vision,
        videos=[[], []],
        scene_tokens=scene_tokens,
        scene_mask=scene_mask,
    )
    next_token = torch.randn(2, 1, HIDDEN)
    with torch.no_grad():
        batched, state = mixer(hidden, context)
        step, _ = mixer(next_token, MixerContext.empty(2), state)
        for row, (sample_hidden, sample_vision, sample_scenes) in enumerate(samples):
            length = sample_hidden.shape[1]
            alone_context = MixerContext(
                vision_mask=sample_vision, videos=[[]], scene_tokens=sample_scenes
            )
            alone, alone_state = mixer(sample_hidden, alone_context)
            alone_step, _ = mixer(next_token[row : row + 1], MixerContext.empty(1), alone_state)
            assert torch.allclose(batched[row, longest - length :], alone[0], atol=1e-5)
            assert torch.allclose(step[row], alone_step[0], atol=1e-5)
    assert torch.isfinite(batched).all()


def test_bf16_runs():
    _, _, mixer = hybrid()
    hidden, vision, scenes = video_sample()
    context = context_for(vision, scenes, 0, hidden.shape[1])
    with torch.no_grad():
        reference, _ = mixer(hidden, context)
        mixer.to(torch.bfloat16)
        mixer.cross_attention.norm.to(torch.bfloat16)
        output, state = mixer(hidden.to(torch.bfloat16), context)
        step, _ = mixer(hidden[:, :1].to(torch.bfloat16), MixerContext.empty(1), state)
    assert output.dtype == torch.bfloat16 and step.dtype == torch.bfloat16
    assert state["time_mix.wkv"].dtype == torch.float32
    assert torch.isfinite(step).all()
    assert (output.float() - reference).norm() / reference.norm() < 0.05


def test_gradients_reach_both_branches_at_init():
    _, _, mixer = hybrid(open_gate=False)
    hidden, vision, scenes = video_sample()
    output, _ = mixer(hidden, context_for(vision, scenes, 0, hidden.shape[1]))
    (output - torch.randn_like(output)).square().sum().backward()
    assert mixer.cross_attention.static_gate.grad.abs().item() > 0
    for name in ("receptance.weight", "decay_base", "bonus", "gate.bias", "output_norm.weight"):
        assert torch.count_nonzero(mixer.time_mix.get_parameter(name).grad) > 0, name


def test_bad_state_and_branches_raise_value_errors():
    _, norm, mixer = hybrid()
    hidden, vision, scenes = video_sample()
    _, state = mixer(hidden, context_for(vision, scenes, 0, hidden.shape[1]))
    del state["time_mix.shift"]
    with pytest.raises(ValueError, match="state must be a dict with keys"):
        mixer(hidden[:, :1], None, state)
    with pytest.raises(ValueError, match="hidden_size"):
        HybridRWKVMixer(
            RWKV6TimeMix(HIDDEN, HEADS, HEAD_DIM),
            GatedCrossAttention(2 * HIDDEN, HEADS, KV_HEADS, HEAD_DIM, norm),
        )
