"""M-MATE (linvid/layers/mmate.py, paper 003 §3.1, Algorithm 1): weight reuse from a real
Qwen2_5_VLAttention (eq. 4-5), the Rotary Major Scan per layer and per sample, the vision-only
reverse direction (eq. 2), Local-Swin against window_attention_3d, the fusion, state carrying,
padding, dtype and input checks."""

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

from linvid.layers.base import MixerContext, VideoLayout
from linvid.layers.mamba2 import SILU_FIXED_POINT
from linvid.layers.mmate import MMATE, FlexMA, LocalSwin
from linvid.ops.scan import rms_sequence_permutation
from linvid.ops.window_attention import window_attention_3d

LENGTH = 19
# Per sample (text before, grid, text after): different layouts in one batch.
LAYOUTS = ((3, (2, 2, 3), 4), (2, (3, 2, 2), 5))
# Layer 1: an odd layer, so Local-Swin shifts its windows.
teacher = functools.partial(teacher_attention, layer_idx=1)


def video_context(layouts=LAYOUTS, length=LENGTH, offsets=None, padding=None) -> MixerContext:
    """Context for samples 'text, one video, text'; offsets shift a sample's video right (left
    padding), default 0; padding: (B, L) padding_mask or None."""
    offsets = (0,) * len(layouts) if offsets is None else offsets
    videos, vision_mask = [], torch.zeros(len(layouts), length, dtype=torch.bool)
    for sample, ((before, grid, _), offset) in enumerate(zip(layouts, offsets, strict=True)):
        count = grid[0] * grid[1] * grid[2]
        positions = torch.arange(before + offset, before + offset + count)
        videos.append([VideoLayout(positions, grid)])
        vision_mask[sample, positions] = True
    return MixerContext(padding_mask=padding, vision_mask=vision_mask, videos=videos)


def random_block(layer_idx: int = 1, seed: int = 0, **options) -> MMATE:
    """Plain-constructor block: random conv, gates, z (nothing at identity) with GQA and biases."""
    torch.manual_seed(seed)
    return MMATE(
        HIDDEN,
        HEADS,
        HEAD_DIM,
        layer_idx,
        num_key_value_heads=KV_HEADS,
        projection_bias=True,
        **options,
    )


def random_flex(layer_idx: int, seed: int = 0) -> FlexMA:
    torch.manual_seed(seed)
    return FlexMA(
        HIDDEN, HEADS, HEAD_DIM, layer_idx, num_key_value_heads=KV_HEADS, projection_bias=True
    )


def test_from_attention_initialises_both_branches_from_the_teacher():
    attention = teacher(layer_idx=1)
    block = MMATE.from_attention(attention, text_config())
    assert block.layer_idx == 1 and block.flex.layer_idx == 1 and block.swin.layer_idx == 1
    flex_pairs = (
        (block.flex.c_proj, attention.q_proj),
        (block.flex.b_proj, attention.k_proj),
        (block.flex.x_proj, attention.v_proj),
    )
    swin_pairs = (
        (block.swin.q_proj, attention.q_proj),
        (block.swin.k_proj, attention.k_proj),
        (block.swin.v_proj, attention.v_proj),
    )
    for target, source in flex_pairs + swin_pairs:
        assert torch.equal(target.weight, source.weight)
        assert torch.equal(target.bias, source.bias)
    assert torch.equal(block.flex.out_proj.weight, attention.o_proj.weight)
    assert torch.equal(block.swin.o_proj.weight, attention.o_proj.weight)
    # Two trainable copies, not one shared tensor.
    assert block.flex.c_proj.weight.data_ptr() != block.swin.q_proj.weight.data_ptr()

    for scan in (block.flex.forward_scan, block.flex.reverse_scan):
        taps = scan.conv.weight[:, 0]
        assert torch.equal(taps[:, -1], torch.ones(taps.shape[0]))
        assert torch.equal(taps[:, :-1], torch.zeros(taps.shape[0], 3))
        assert torch.equal(scan.conv.bias, torch.zeros_like(scan.conv.bias))
    assert torch.equal(block.flex.direction_gate.weight, torch.zeros(HEADS, HIDDEN))
    assert torch.equal(block.flex.direction_gate.bias, torch.zeros(HEADS))
    assert torch.equal(block.flex.z_proj.weight, torch.zeros(HEADS * HEAD_DIM, HIDDEN))
    assert torch.equal(block.flex.z_proj.bias, torch.full((HEADS * HEAD_DIM,), SILU_FIXED_POINT))
    assert block.flex_weight.item() == 0.5
    scaled = attention.o_proj.weight * block.flex.norm.weight
    expected_scale = scaled.square().sum(1).mean().sqrt()
    torch.testing.assert_close(block.norm.weight, expected_scale.expand(HIDDEN))
    assert torch.equal(block.norm.bias, torch.zeros(HIDDEN))


def test_layer_idx_must_come_from_somewhere():
    attention = teacher()
    attention.layer_idx = None
    with pytest.raises(ValueError, match="layer_idx"):
        MMATE.from_attention(attention, text_config())
    assert MMATE.from_attention(attention, text_config(), layer_idx=2).layer_idx == 2


def test_output_at_init_is_on_the_teacher_scale():
    attention = teacher()
    block = MMATE.from_attention(attention, text_config())
    hidden = torch.randn(2, LENGTH, HIDDEN)
    with torch.no_grad():
        expected = teacher_output(attention, hidden)
        output, _ = block(hidden, video_context())
    assert bool(output.isfinite().all())
    ratio = output.std() / expected.std()
    assert 1 / 3 < ratio < 3, f"student/teacher output std ratio {ratio:.3f}"


def test_output_is_layer_norm_of_the_lambda_weighted_branches():
    block = random_block()
    with torch.no_grad():
        block.flex_weight.fill_(0.3)
        block.norm.weight.uniform_(0.5, 1.5)
    hidden = torch.randn(2, LENGTH, HIDDEN)
    context = video_context()
    output, _ = block(hidden, context)
    flex, _ = block.flex(hidden, context)
    swin = block.swin(hidden, context)
    expected = block.norm(0.3 * flex + 0.7 * swin)
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("build", ["random", "teacher"])
def test_prefill_in_chunks_and_decoding_equal_one_forward(build):
    if build == "random":
        block = random_block(chunk_size=4)
    else:
        block = MMATE.from_attention(teacher(), text_config(), chunk_size=4)
    hidden = torch.randn(2, LENGTH, HIDDEN)
    full, full_state = block(hidden, video_context())

    # The first call holds both videos (positions 3-14 and 2-13) and some text after them.
    prefix = 16
    output, state = block(hidden[:, :prefix], video_context(length=prefix))
    outputs = [output]
    for start, stop in ((16, 18), (18, 19)):
        output, state = block(hidden[:, start:stop], MixerContext.empty(2), state)
        outputs.append(output)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-5, atol=1e-5)
    for key in ("conv", "ssm"):
        torch.testing.assert_close(state[key], full_state[key], rtol=1e-5, atol=1e-5)

    output, state = block(hidden[:, :15], video_context(length=15))
    outputs = [output]
    for t in range(15, LENGTH):
        output, state = block(hidden[:, t : t + 1], MixerContext.empty(2), state)
        outputs.append(output)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_real_tokens():
    block = random_block(chunk_size=4)
    pads = 3
    hidden = torch.randn(2, LENGTH, HIDDEN)
    padded = torch.cat((100 * torch.randn(2, pads, HIDDEN), hidden), dim=1)
    padding_mask = torch.ones(2, LENGTH + pads, dtype=torch.bool)
    padding_mask[0, :pads] = False
    padded[1] = torch.cat((hidden[1], torch.randn(pads, HIDDEN)))  # sample 1: all real
    context = video_context(length=LENGTH + pads, offsets=(pads, 0), padding=padding_mask)
    output, state = block(padded, context)
    alone, alone_state = block(hidden[:1], video_context(layouts=LAYOUTS[:1]))
    torch.testing.assert_close(output[:1, pads:], alone, rtol=1e-5, atol=1e-5)
    for key in ("conv", "ssm"):
        torch.testing.assert_close(state[key][:1], alone_state[key], rtol=1e-5, atol=1e-5)
    step = torch.randn(2, 1, HIDDEN)
    next_output, _ = block(step, MixerContext.empty(2), state)
    alone_next, _ = block(step[:1], MixerContext.empty(1), alone_state)
    torch.testing.assert_close(next_output[:1], alone_next, rtol=1e-5, atol=1e-5)


def test_flex_scans_each_video_in_its_layers_rotary_major_order():
    """FlexMA at layer l == layer 0 (raster order) run on the sequence already put in layer l's
    scan order, then put back; the orders of layers 0-3 differ and layer 4 repeats layer 0."""
    hidden = torch.randn(2, LENGTH, HIDDEN)
    context = video_context()
    raster = random_flex(0)
    outputs = []
    for layer in range(5):
        flex = random_flex(layer)
        flex.load_state_dict(raster.state_dict())
        output, _ = flex(hidden, context)
        outputs.append(output)
        scanned, expected = torch.empty_like(hidden), torch.empty_like(hidden)
        permutations = []
        for sample, layouts in enumerate(context.videos):
            videos = [(layout.positions, layout.grid) for layout in layouts]
            permutations.append(rms_sequence_permutation(LENGTH, videos, layer))
            scanned[sample] = hidden[sample, permutations[-1][0]]
        raster_output, _ = raster(scanned, context)
        for sample, (_, inverse) in enumerate(permutations):
            expected[sample] = raster_output[sample, inverse]
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    for first in range(4):
        for second in range(first + 1, 4):
            assert (outputs[first] - outputs[second]).abs().max() > 1e-3, (first, second)
    torch.testing.assert_close(outputs[4], outputs[0], rtol=0, atol=0)


def test_changing_layer_idx_mod_4_changes_the_block_output():
    hidden = torch.randn(2, LENGTH, HIDDEN)
    reference = random_block(layer_idx=0)
    outputs = {}
    for layer in (0, 2, 4):  # even layers: same Local-Swin (unshifted), only the scan differs
        block = random_block(layer_idx=layer)
        block.load_state_dict(reference.state_dict())
        outputs[layer], _ = block(hidden, video_context())
    assert (outputs[0] - outputs[2]).abs().max() > 1e-3
    torch.testing.assert_close(outputs[4], outputs[0], rtol=0, atol=0)


TWO_VIDEOS = {  # text 0-1, video A 2-9 (grid (2, 2, 2)), text 10-12, video B 13-16, text 17-18
    "a": torch.arange(2, 10),
    "b": torch.arange(13, 17),
    "text_between": (10, 11, 12),
    "text_after": (17, 18),
}


def two_video_context() -> MixerContext:
    vision_mask = torch.zeros(1, LENGTH, dtype=torch.bool)
    vision_mask[0, 2:10] = True
    vision_mask[0, 13:17] = True
    videos = [[VideoLayout(TWO_VIDEOS["a"], (2, 2, 2)), VideoLayout(TWO_VIDEOS["b"], (1, 2, 2))]]
    return MixerContext(vision_mask=vision_mask, videos=videos)


def test_reverse_direction_reads_only_vision_tokens():
    """Paper 003 eq. 2. Video A's tokens come before the perturbed tokens, so the causal forward
    direction cannot carry a change back to them: only the reverse direction can."""
    flex = random_flex(layer_idx=1)
    context = two_video_context()
    hidden = torch.randn(1, LENGTH, HIDDEN)
    base, _ = flex(hidden, context)
    a = TWO_VIDEOS["a"]
    for position in TWO_VIDEOS["text_between"] + TWO_VIDEOS["text_after"]:
        perturbed = hidden.clone()
        perturbed[0, position] += 10 * torch.randn(HIDDEN)
        output, _ = flex(perturbed, context)
        torch.testing.assert_close(output[0, a], base[0, a], rtol=0, atol=1e-6)
        assert (output[0, position] - base[0, position]).abs().max() > 1e-3  # it was perturbed
    # Positive controls: a vision token of video B does reach video A and the text before both
    # videos, through the reverse direction.
    perturbed = hidden.clone()
    perturbed[0, 14] += 10 * torch.randn(HIDDEN)
    output, _ = flex(perturbed, context)
    assert (output[0, a] - base[0, a]).abs().max() > 1e-3
    assert (output[0, :2] - base[0, :2]).abs().max() > 1e-3


def test_reverse_direction_contributes_nothing_after_the_last_video():
    flex = random_flex(layer_idx=2)
    context = two_video_context()
    hidden = torch.randn(1, LENGTH, HIDDEN)
    base, _ = flex(hidden, context)
    with torch.no_grad():
        for parameter in flex.reverse_scan.parameters():
            parameter.add_(torch.randn_like(parameter))
    output, _ = flex(hidden, context)
    after = list(TWO_VIDEOS["text_after"])
    torch.testing.assert_close(output[0, after], base[0, after], rtol=0, atol=0)
    assert (output[0, TWO_VIDEOS["a"]] - base[0, TWO_VIDEOS["a"]]).abs().max() > 1e-3


def swin_reference(attention, hidden, positions, grid, window, shift):
    """The teacher's projections (no rotary) -> window_attention_3d -> o_proj, one video."""
    tokens = hidden[:, positions]
    q = attention.q_proj(tokens).unflatten(-1, (HEADS, HEAD_DIM))
    k = attention.k_proj(tokens).unflatten(-1, (KV_HEADS, HEAD_DIM))[:, :, [0, 0, 1, 1]]
    v = attention.v_proj(tokens).unflatten(-1, (KV_HEADS, HEAD_DIM))[:, :, [0, 0, 1, 1]]
    return attention.o_proj(window_attention_3d(q, k, v, grid, window, shift).flatten(2))


@pytest.mark.parametrize("layer_idx, shift", [(0, (0, 0, 0)), (3, (1, 1, 1))])
def test_local_swin_is_window_attention_on_vision_tokens_and_zero_on_text(layer_idx, shift):
    attention = teacher()
    swin = LocalSwin(
        HIDDEN,
        HEADS,
        HEAD_DIM,
        layer_idx,
        num_key_value_heads=KV_HEADS,
        window=(2, 2, 2),
        projection_bias=True,
    )
    swin.init_from_attention(attention)
    grids = ((3, 4, 4), (3, 3, 4))  # 48 and 36 tokens; the second has partial windows
    starts = (2, 9)
    length = 52
    videos = [
        [VideoLayout(torch.arange(start, start + grid[0] * grid[1] * grid[2]), grid)]
        for start, grid in zip(starts, grids, strict=True)
    ]
    vision_mask = torch.zeros(2, length, dtype=torch.bool)
    for sample, layouts in enumerate(videos):
        vision_mask[sample, layouts[0].positions] = True
    hidden = torch.randn(2, length, HIDDEN)
    output = swin(hidden, MixerContext(vision_mask=vision_mask, videos=videos))
    assert torch.equal(output[~vision_mask], torch.zeros(int((~vision_mask).sum()), HIDDEN))
    for sample, layouts in enumerate(videos):
        layout = layouts[0]
        assert swin.window_and_shift(layout.grid) == ((2, 2, 2), shift)
        expected = swin_reference(
            attention, hidden[sample : sample + 1], layout.positions, layout.grid, (2, 2, 2), shift
        )
        torch.testing.assert_close(output[sample, layout.positions], expected[0])


def test_local_swin_window_is_clipped_and_unshifted_along_covered_axes():
    swin = LocalSwin(HIDDEN, HEADS, HEAD_DIM, 1)  # default window (16, 4, 4), odd layer
    assert swin.window == (16, 4, 4)
    assert swin.window_and_shift((2, 2, 3)) == ((2, 2, 3), (0, 0, 0))
    assert swin.window_and_shift((32, 8, 4)) == ((16, 4, 4), (8, 2, 0))


def test_bfloat16_runs_with_float32_state():
    block = MMATE.from_attention(teacher(), text_config())
    hidden = torch.randn(2, LENGTH, HIDDEN)
    expected, _ = block(hidden, video_context())
    block = block.to(torch.bfloat16)
    output, state = block(hidden.bfloat16(), video_context())
    step, _ = block(hidden[:, :1].bfloat16(), MixerContext.empty(2), state)
    assert output.dtype == torch.bfloat16 and step.dtype == torch.bfloat16
    assert state["conv"].dtype == torch.float32 and state["ssm"].dtype == torch.float32
    assert bool(output.isfinite().all()) and bool(step.isfinite().all())
    assert (output.float() - expected).norm() / expected.norm() < 0.05


def test_gradients_reach_every_parameter():
    block = MMATE.from_attention(teacher(), text_config())
    hidden = torch.randn(2, LENGTH, HIDDEN, requires_grad=True)
    output, _ = block(hidden, video_context())
    (output * torch.randn_like(output)).sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().max() > 0, name
    assert hidden.grad.abs().max() > 0


def test_bad_inputs_raise_value_errors_naming_the_argument():
    block = random_block()
    hidden = torch.randn(2, LENGTH, HIDDEN)
    context = video_context()
    with pytest.raises(ValueError, match="hidden_states"):
        block(torch.randn(2, LENGTH, HIDDEN - 1), context)
    with pytest.raises(ValueError, match="context.videos"):
        block(hidden, MixerContext(vision_mask=context.vision_mask, videos=context.videos[:1]))
    with pytest.raises(ValueError, match="context.vision_mask"):
        block(hidden, MixerContext(vision_mask=~context.vision_mask, videos=context.videos))
    with pytest.raises(ValueError, match="context.vision_mask"):
        block(hidden, MixerContext(vision_mask=context.vision_mask.float(), videos=context.videos))
    out_of_range = [[VideoLayout(torch.arange(10, 22), (2, 2, 3))], context.videos[1]]
    with pytest.raises(ValueError, match=r"context.videos\[0\]\[0\].positions"):
        block(hidden, MixerContext(videos=out_of_range))
    wrong_count = [[VideoLayout(torch.arange(3, 15), (2, 2, 2))], context.videos[1]]
    with pytest.raises(ValueError, match=r"context.videos\[0\]\[0\].positions"):
        block(hidden, MixerContext(videos=wrong_count))
    overlapping = [
        [VideoLayout(torch.arange(0, 4), (1, 2, 2)), VideoLayout(torch.arange(2, 6), (1, 2, 2))],
        [],
    ]
    with pytest.raises(ValueError, match=r"context.videos\[0\]\[1\]"):
        block(hidden, MixerContext(videos=overlapping))
    with pytest.raises(ValueError, match="grid"):
        block(hidden, MixerContext(videos=[[VideoLayout(torch.arange(4), (0, 2, 2))], []]))
    with pytest.raises(ValueError, match="state"):
        block(hidden, context, {"conv": torch.zeros(2, 128, 3)})
    with pytest.raises(ValueError, match="window"):
        MMATE(HIDDEN, HEADS, HEAD_DIM, 0, window=(4, 4))
    with pytest.raises(ValueError, match="layer_idx"):
        MMATE(HIDDEN, HEADS, HEAD_DIM, -1)


def test_text_only_calls_need_no_video_context():
    block = random_block()
    hidden = torch.randn(2, 7, HIDDEN)
    output, _ = block(hidden, MixerContext.empty(2))
    flex, _ = block.flex(hidden, MixerContext.empty(2))
    assert torch.equal(block.swin(hidden, MixerContext.empty(2)), torch.zeros_like(hidden))
    torch.testing.assert_close(output, block.norm(block.flex_weight * flex))
