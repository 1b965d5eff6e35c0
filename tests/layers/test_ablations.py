"""The papers' ablation switches (issue 14): paper 000 Table 4's static-only gate (one learnable
scalar for every text token, no dynamic gate) and random RWKV init (the RWKV branch only);
paper 003 Table 4's single-branch M-MATE blocks (Flex-MA alone, Local-Swin alone)."""

import pytest
import torch
from layer_teachers import HIDDEN, teacher_attention, text_config
from test_cross_attention import batch_with_scenes, open_gates
from test_mmate import LENGTH, random_block, video_context
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from linvid.layers.cross_attention import GatedCrossAttention
from linvid.layers.hybrid_rwkv import HybridRWKVMixer
from linvid.layers.mmate import MMATE


def gated_pair():
    attention = teacher_attention(0, layer_idx=1, bias_std=0.1)
    norm = Qwen2_5_VLRMSNorm(HIDDEN, eps=1e-6)
    dynamic = GatedCrossAttention.from_attention(attention, text_config(), norm)
    static = GatedCrossAttention.from_attention(attention, text_config(), norm, gate="static")
    return dynamic, static


def test_the_static_gate_is_one_scalar_for_every_text_token():
    dynamic, static = gated_pair()
    assert not hasattr(static, "dynamic_gate")
    assert {name for name, _ in static.named_parameters()} == {
        name for name, _ in dynamic.named_parameters() if not name.startswith("dynamic_gate")
    }
    hidden, context = batch_with_scenes()
    with torch.no_grad():
        dynamic.static_gate.fill_(0.7)
        static.static_gate.fill_(0.7)
        dynamic_output, _ = dynamic(hidden, context)
        static_output, _ = static(hidden, context)
    # At init g_d = tanh(atanh(1/2)) = 1/2 for every token, so the static branch is twice it.
    assert static_output.abs().sum() > 0
    torch.testing.assert_close(static_output, 2 * dynamic_output)
    open_gates(dynamic)  # a trained dynamic gate: the two differ token by token
    with torch.no_grad():
        ratio = static_output / dynamic(hidden, context)[0]
    text = static_output.abs().sum(-1) > 0
    assert ratio[text].std() > 1e-3


def test_the_static_gate_decodes_like_its_prefill():
    _, static = gated_pair()
    hidden, context = batch_with_scenes()
    with torch.no_grad():
        static.static_gate.fill_(0.7)
        _, state = static(hidden, context)
        step = torch.randn(2, 1, HIDDEN)
        decoded, _ = static(step, None, state)
        scenes_only = type(context)(
            padding_mask=None,
            vision_mask=None,
            videos=[[], []],
            scene_tokens=context.scene_tokens,
            scene_mask=context.scene_mask,
        )
        alone, _ = static(step, scenes_only)
    torch.testing.assert_close(decoded, alone)


def test_the_random_rwkv_init_keeps_the_cross_attention_transferred():
    attention = teacher_attention(0, layer_idx=1, bias_std=0.1)
    fresh = teacher_attention(5, layer_idx=1)
    norm = Qwen2_5_VLRMSNorm(HIDDEN, eps=1e-6)
    mixer = HybridRWKVMixer.from_attention(
        attention, text_config(), norm, time_mix_attention=fresh, gate="static"
    )
    assert torch.equal(mixer.cross_attention.query.weight, attention.q_proj.weight)
    assert torch.equal(mixer.cross_attention.value.bias, attention.v_proj.bias)
    assert mixer.cross_attention.gate == "static"

    def holds(module, weight):
        return any(torch.equal(value, weight) for value in module.parameters())

    # RWKV-6's receptance and output come from the re-initialised copy's W_Q and W_O (its keys
    # and values repeat W_K, W_V's grouped heads), not from the teacher's.
    for projection in ("q_proj", "o_proj"):
        assert holds(mixer.time_mix, getattr(fresh, projection).weight), projection
        assert not holds(mixer.time_mix, getattr(attention, projection).weight), projection


def test_flex_only_is_the_layer_norm_of_flex_ma():
    both = random_block()
    flex_only = random_block(branches="flex")
    names = {name for name, _ in flex_only.named_parameters()}
    assert not any(name.startswith(("swin.", "flex_weight")) for name in names)
    flex_only.flex.load_state_dict(both.flex.state_dict())
    with torch.no_grad():
        flex_only.norm.weight.uniform_(0.5, 1.5)
    hidden = torch.randn(2, LENGTH, HIDDEN)
    context = video_context()
    output, state = flex_only(hidden, context)
    flex, flex_state = both.flex(hidden, context)
    torch.testing.assert_close(output, flex_only.norm(flex), rtol=1e-6, atol=1e-6)
    assert state.keys() == flex_state.keys()


def test_swin_only_is_window_attention_alone_with_no_state():
    both = random_block()
    swin_only = random_block(branches="swin")
    assert swin_only.flex is None and swin_only.flex_weight is None
    swin_only.swin.load_state_dict(both.swin.state_dict())
    hidden = torch.randn(2, LENGTH, HIDDEN)
    context = video_context()
    output, state = swin_only(hidden, context)
    assert state == {}
    torch.testing.assert_close(output, swin_only.norm(both.swin(hidden, context)))
    text = ~context.vision_mask
    assert torch.all(output[text] == 0)  # LayerNorm of zeros with bias 0: text gets nothing
    decoded, _ = swin_only(torch.randn(2, 1, HIDDEN), None, {})
    assert torch.all(decoded == 0)


def test_single_branch_blocks_start_from_the_teacher():
    attention = teacher_attention(0, layer_idx=1, bias_std=0.1)
    flex_only = MMATE.from_attention(attention, text_config(), branches="flex")
    swin_only = MMATE.from_attention(attention, text_config(), branches="swin")
    both = MMATE.from_attention(attention, text_config())

    def holds(module, weight):
        return any(torch.equal(value, weight) for value in module.parameters())

    # Flex-MA's C, x, out and Local-Swin's Q, V, O from W_Q, W_V, W_O (paper 003 eq. 4-5).
    for projection in ("q_proj", "v_proj", "o_proj"):
        weight = getattr(attention, projection).weight
        assert holds(flex_only.flex, weight) and holds(both.flex, weight), projection
        assert holds(swin_only.swin, weight) and holds(both.swin, weight), projection
    torch.testing.assert_close(flex_only.norm.weight, both.norm.weight)
    assert torch.all(swin_only.norm.weight == 1)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: random_block(branches="local"), "unknown M-MATE branches 'local'"),
        (
            lambda: (
                gated_pair()
                and GatedCrossAttention(HIDDEN, 4, 2, 16, torch.nn.Identity(), gate="none")
            ),
            "unknown cross-attention gate 'none'",
        ),
    ],
)
def test_unknown_ablations_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()
