"""GatedCrossAttention (paper 000 eq. 11-12) at the edges test_cross_attention.py leaves out:
calls with no padding or vision mask at all (one token and several), a call of one padding
token, a video of one scene token, decoding with no scenes or with a sample whose scenes are all
padding, a teacher whose o_proj has a bias, the plain constructor's biases, and the whole
message of each malformed scene input or cached state. Each output is checked against
test_cross_attention's token-by-token reference. Written for the surviving
mutants of issue 18's mutation run; tiny sizes (hidden 64, 4 heads, 2 kv heads, head_dim 16)."""

import torch
from layer_teachers import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, teacher_attention, text_config
from test_cross_attention import batch_with_scenes, cross_attention, open_gates, reference_branch
from test_layer_edges import raises_exactly
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from linvid.layers.base import MixerContext
from linvid.layers.cross_attention import GatedCrossAttention


def scene_context(batch=2, scenes=4, seed=2):
    """Scene tokens (un-normalised) and their mask, no padding or vision mask."""
    generator = torch.Generator().manual_seed(seed)
    scene_tokens = 3.0 * torch.randn(batch, scenes, HIDDEN, generator=generator)
    return MixerContext(
        videos=[[] for _ in range(batch)],
        scene_tokens=scene_tokens,
        scene_mask=torch.ones(batch, scenes, dtype=torch.bool),
    )


def reference(attention, norm, module, hidden, context):
    """reference_branch with the masks the context leaves out spelled in full: every token is
    real text, every scene is real."""
    batch, length, _ = hidden.shape
    padding = context.padding_mask
    full = MixerContext(
        padding_mask=torch.ones(batch, length, dtype=torch.bool) if padding is None else padding,
        vision_mask=torch.zeros(batch, length, dtype=torch.bool),
        videos=context.videos,
        scene_tokens=context.scene_tokens,
        scene_mask=context.scene_mask,
    )
    return reference_branch(attention, norm, module, hidden, full)


def test_calls_without_padding_or_vision_masks_match_the_reference():
    attention, norm, module = cross_attention(open_gate=True)
    context = scene_context()
    for length in (1, 2, 5):  # one token (a decoding step) and several (a prefill)
        hidden = torch.randn(2, length, HIDDEN)
        with torch.no_grad():
            output, state = module(hidden, context)
            expected = reference(attention, norm, module, hidden, context)
        assert output.shape == (2, length, HIDDEN)
        assert bool((output.abs().sum(-1) > 0).all())
        torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-5)
        assert state["scene_keys"].shape == (2, KV_HEADS, 4, HEAD_DIM)


def test_a_call_of_one_padding_token_gives_it_zero():
    attention, norm, module = cross_attention(open_gate=True)
    context = scene_context()
    context.padding_mask = torch.tensor([[True], [False]])
    hidden = torch.randn(2, 1, HIDDEN)
    with torch.no_grad():
        output, _ = module(hidden, context)
        expected = reference(attention, norm, module, hidden, context)
    assert torch.count_nonzero(output[1]) == 0
    assert torch.count_nonzero(output[0]) > 0
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-5)


def test_a_video_of_one_scene_token_is_attended_in_prefill_and_decoding():
    attention, norm, module = cross_attention(open_gate=True)
    context = scene_context(scenes=1)
    hidden = torch.randn(2, 4, HIDDEN)
    with torch.no_grad():
        full, _ = module(hidden, context)
        expected = reference(attention, norm, module, hidden, context)
        prefill, state = module(hidden[:, :3], context)
        step, _ = module(hidden[:, 3:], MixerContext.empty(2), state)
    assert bool((full.abs().sum(-1) > 0).all())
    torch.testing.assert_close(full, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([prefill, step], 1), expected, atol=1e-6, rtol=1e-5)


def test_decoding_without_any_scene_gives_zero_and_carries_an_empty_state():
    _, _, module = cross_attention(open_gate=True)
    hidden = torch.randn(2, 3, HIDDEN)
    state = None
    with torch.no_grad():
        for position in range(3):  # the first step starts the state, the next ones carry it
            output, state = module(hidden[:, position : position + 1], None, state)
            assert output.shape == (2, 1, HIDDEN) and torch.count_nonzero(output) == 0
            assert state["scene_keys"].shape == (2, KV_HEADS, 0, HEAD_DIM)
            assert state["scene_values"].shape == (2, KV_HEADS, 0, HEAD_DIM)
            assert state["scene_mask"].shape == (2, 0)
            assert state["scene_mask"].dtype == torch.bool


def test_decoding_gives_zero_to_a_sample_whose_scenes_are_all_padding():
    attention, norm, module = cross_attention(open_gate=True)
    context = scene_context()
    context.scene_mask[1] = False
    hidden = torch.randn(2, 3, HIDDEN)
    with torch.no_grad():
        _, state = module(hidden[:, :2], context)
        step, _ = module(hidden[:, 2:], MixerContext.empty(2), state)
        expected = reference(attention, norm, module, hidden[:, 2:], context)
    assert torch.count_nonzero(step[1]) == 0
    assert torch.count_nonzero(step[0]) > 0
    torch.testing.assert_close(step, expected, atol=1e-6, rtol=1e-5)


def test_a_teacher_output_bias_is_copied_and_added():
    attention = teacher_attention(3, layer_idx=1, bias_std=0.1)
    attention.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=True)
    with torch.no_grad():
        attention.o_proj.bias.normal_(0.0, 0.5)
    norm = Qwen2_5_VLRMSNorm(HIDDEN, eps=1e-6)
    module = GatedCrossAttention.from_attention(attention, text_config(), norm)
    open_gates(module)
    assert torch.equal(module.output.bias, attention.o_proj.bias)
    context = scene_context()
    hidden = torch.randn(2, 3, HIDDEN)
    with torch.no_grad():
        output, _ = module(hidden, context)
        expected = reference(attention, norm, module, hidden, context)
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-5)


def test_the_plain_constructor_adds_biases_only_where_asked():
    norm = Qwen2_5_VLRMSNorm(HIDDEN)
    plain = GatedCrossAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, norm)
    projections = ("query", "key", "value", "output")
    assert all(getattr(plain, name).bias is None for name in projections)
    biased = GatedCrossAttention(
        HIDDEN, HEADS, KV_HEADS, HEAD_DIM, norm, projection_bias=True, output_bias=True
    )
    assert all(getattr(biased, name).bias is not None for name in projections)
    output_only = GatedCrossAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, norm, output_bias=True)
    assert [getattr(output_only, name).bias is not None for name in projections] == [
        False,
        False,
        False,
        True,
    ]


def test_malformed_scene_tokens_and_masks_get_whole_messages():
    _, _, module = cross_attention()
    hidden, context = batch_with_scenes()
    scene_tokens = context.scene_tokens  # (2, 5, hidden)
    cases = (
        (
            MixerContext(scene_tokens=[[0.0]]),
            "context.scene_tokens must be a torch.Tensor (B, S, hidden), got list",
        ),
        (
            MixerContext(scene_tokens=torch.zeros(2, HIDDEN)),
            "context.scene_tokens must have 3 dimensions (B, S, hidden), "
            "got shape (2, 64) dtype float32",
        ),
        (
            MixerContext(scene_tokens=torch.zeros(2, 5, HIDDEN + 1)),
            "context.scene_tokens must have shape (B, S, hidden) = (2, 5, 64), "
            "got shape (2, 5, 65) dtype float32",
        ),
        (
            MixerContext(scene_tokens=scene_tokens, scene_mask=torch.ones(2, 5)),
            "context.scene_mask must be a bool tensor (B, S), got shape (2, 5) dtype float32",
        ),
        (
            MixerContext(scene_tokens=scene_tokens, scene_mask=torch.ones(2, 4, dtype=torch.bool)),
            "context.scene_mask must have shape (B, S) = (2, 5), got shape (2, 4) dtype bool",
        ),
    )
    for bad, message in cases:
        with raises_exactly(message):
            module(hidden, bad)


def test_a_malformed_cached_scene_state_gets_a_whole_message():
    _, _, module = cross_attention()
    hidden, context = batch_with_scenes()
    with torch.no_grad():
        _, state = module(hidden, context)  # scene_keys, scene_values: (2, 2, 5, 16)
    step = hidden[:, :1]
    cases = (
        (
            {"scene_keys": state["scene_keys"][:, 0]},
            "state['scene_keys'] must have 4 dimensions (B, H_kv, S, head_dim), "
            "got shape (2, 5, 16) dtype float32",
        ),
        (
            {"scene_keys": state["scene_keys"][:, :1]},
            "state['scene_keys'] must have shape (B, H_kv, S, head_dim) = (2, 2, 5, 16), "
            "got shape (2, 1, 5, 16) dtype float32",
        ),
        (
            {"scene_values": state["scene_values"][:, 0]},
            "state['scene_values'] must have 4 dimensions (B, H_kv, S, head_dim), "
            "got shape (2, 5, 16) dtype float32",
        ),
        (
            {"scene_values": state["scene_values"][:, :, :2]},
            "state['scene_values'] must have shape (B, H_kv, S, head_dim) = (2, 2, 5, 16), "
            "got shape (2, 2, 2, 16) dtype float32",
        ),
        (
            {"scene_mask": state["scene_mask"].float()},
            "state['scene_mask'] must be a bool tensor (B, S), got shape (2, 5) dtype float32",
        ),
        (
            {"scene_mask": state["scene_mask"][:, :4]},
            "state['scene_mask'] must have shape (B, S) = (2, 5), got shape (2, 4) dtype bool",
        ),
    )
    for change, message in cases:
        with raises_exactly(message):
            module(step, None, state | change)
