"""The scene path of paper 000's hybrid students (`qwen-rwkv-vl-*`), checked at model level
with the cross-attention's gates open and videos that have real scene structure.

Each test video is a few runs of near-identical temporal patches (one random pattern per run
plus a little noise), so the vision tower's per-frame features cut a scene exactly between
runs (paper 000 eq. 8-9) and the scene tokens are the run means (eq. 10). Forward hooks on the
hybrid mixers record what they receive and return; that is compared with scene tokens computed
here from the teacher's vision tower (`scene_boundaries` at the plan's own threshold and
max_scenes, and the run means written out), and each hybrid layer's output with a dense
float64 reference of eq. 11-12 built from the teacher attention's own weights, one text token
and one head at a time. Tiny model: 4 decoder layers, hidden 64, 4 heads, 2 kv heads."""

import dataclasses
import math

import pytest
import torch
from qwen_inputs import PATCH_VALUES, batch_inputs
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.layers.hybrid_rwkv import HybridRWKVMixer
from linvid.models.cache import cache_keyword, output_cache
from linvid.models.plan import resolve_plan
from linvid.models.tiny import VIDEO_TOKEN, VISION_END, VISION_START, tiny_qwen2_5_vl_config
from linvid.video.scenes import scene_boundaries, scene_tokens

PRESET = "qwen-rwkv-vl-50"  # hybrid layers 1 and 3 of 4
FRAME_SIZE = 56  # 4 x 4 patches of 14 pixels: 2 x 2 = 4 merged tokens per temporal patch
MERGED_TOKENS = (FRAME_SIZE // 14 // 2) ** 2
# Temporal patches per run: the first video has 3 scenes, the second 2 (the batch pads one).
RUNS = ((2, 3, 2), (4, 2))
SCENE_COUNTS = (3, 2)
STATIC_GATE = 0.75
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def scene_video(runs, seed, noise=0.02, prefix=(3, 4, 5), suffix=(6, 7, 8)):
    """One video between text tokens, as `qwen_inputs.video_sample` returns it ((L,) ids,
    (P, 1176) pixel rows, (3,) grid): runs[i] temporal patches of one random pattern each,
    plus N(0, noise^2) per patch."""
    generator = torch.Generator().manual_seed(seed)
    patches = (FRAME_SIZE // 14) ** 2
    rows = []
    for length in runs:
        pattern = torch.randn(patches, PATCH_VALUES, generator=generator)
        for _ in range(length):
            rows.append(pattern + noise * torch.randn(patches, PATCH_VALUES, generator=generator))
    frames = sum(runs)
    ids = [*prefix, VISION_START, *([VIDEO_TOKEN] * frames * MERGED_TOKENS), VISION_END, *suffix]
    grid = torch.tensor([frames, FRAME_SIZE // 14, FRAME_SIZE // 14])
    return torch.tensor(ids), torch.cat(rows), grid


def run_cuts(runs):
    """The scene boundaries a video of these runs should get: the last frame of every run
    but the final one (a cut t ends a scene at frame t)."""
    ends = torch.tensor(runs).cumsum(0) - 1
    return ends[:-1].tolist()


@pytest.fixture(scope="module")
def teacher():
    config = tiny_qwen2_5_vl_config(num_layers=4)
    # Wider than the default 0.02, so the scene attention is far from uniform.
    config.text_config.initializer_range = 0.1
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # RMSNorm weights start at 1: drawn here so that each layer's norms differ (the scene
    # tokens must go through their own layer's input_layernorm, paper 000 §4.2).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
    return model


def open_student(teacher, plan=PRESET, seed=1):
    """The teacher converted with `plan`, its cross-attention gates opened deterministically:
    static gate g_s = STATIC_GATE (0 at init) and dynamic-gate weights w_d ~ N(0, 0.3^2)
    (0 at init), so g_d differs from token to token. q/k/v/o stay the teacher's."""
    student = linvid.convert(teacher, plan).eval()
    generator = torch.Generator().manual_seed(seed)
    mixers = hybrid_mixers(student)
    assert sorted(mixers) == list(student.linear_layers) and mixers
    with torch.no_grad():
        for mixer in mixers.values():
            gate = mixer.cross_attention.dynamic_gate.weight
            gate.copy_(0.3 * torch.randn(gate.shape, generator=generator))
            mixer.cross_attention.static_gate.fill_(STATIC_GATE)
    return student


def hybrid_mixers(student):
    """{decoder layer index: its HybridRWKVMixer}."""
    layers = student.model.language_model.layers
    return {
        index: layer.self_attn.mixer
        for index, layer in enumerate(layers)
        if isinstance(getattr(layer.self_attn, "mixer", None), HybridRWKVMixer)
    }


def argument(args, kwargs, position, name):
    """A forward argument given by position or by name (None when absent)."""
    return args[position] if len(args) > position else kwargs.get(name)


def run_recording(student, inputs):
    """One forward of the student without cache; returns (logits, {layer: record}) with each
    hybrid mixer's input hidden states, context, output and returned state."""
    records = {}
    handles = []
    for index, mixer in hybrid_mixers(student).items():

        def record(module, args, kwargs, result, index=index):
            records[index] = {
                "hidden": argument(args, kwargs, 0, "hidden_states").detach().clone(),
                "context": argument(args, kwargs, 1, "context"),
                "output": result[0].detach().clone(),
                "state": {key: value.detach().clone() for key, value in result[1].items()},
            }

        handles.append(mixer.register_forward_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = student(**inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(records) == list(student.linear_layers)
    return logits, records


def per_frame_features(teacher, inputs):
    """Each video's merged vision features from the teacher's own tower, as (T, N, D) frames
    (T temporal patches of N merged tokens)."""
    with torch.no_grad():
        features = teacher.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
        ).pooler_output
    frames = []
    for video, (t, h, w) in zip(features, inputs["video_grid_thw"].tolist(), strict=True):
        frames.append(video.reshape(t, (h // 2) * (w // 2), video.shape[-1]))
    return frames


def run_means(frames, runs):
    """Eq. 10 written out: each run's frames averaged in float64, flattened to (S * N, D)."""
    means, start = [], 0
    for length in runs:
        means.append(frames[start : start + length].double().sum(dim=0) / length)
        start += length
    return torch.cat(means)


def rms_norm(x, weight, eps):
    """Qwen's RMSNorm in float64."""
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps) * weight.double()


def linear(x, projection):
    """x W^T + b in float64 with a transformers Linear's weights."""
    output = x @ projection.weight.double().T
    return output if projection.bias is None else output + projection.bias.double()


def dense_branch(teacher, layer, cross_attention, hidden, text, scenes):
    """Eq. 11-12 for one sample, one text token and one head at a time, in float64:
    g_s * tanh(x w_d + b_d) * W_O concat_h softmax(q_h K_h^T / sqrt(d)) V_h for every text
    token x (zero elsewhere), K and V from the teacher layer's W_K, W_V applied to its
    input_layernorm of `scenes` (S, D), W_Q and W_O the teacher's, grouped kv heads.

    hidden: (L, D) the mixer's input; text: (L,) bool. Returns (L, D) float64."""
    decoder_layer = teacher.model.language_model.layers[layer]
    attention = decoder_layer.self_attn
    config = teacher.config.text_config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    norm = decoder_layer.input_layernorm
    normed = rms_norm(scenes.double(), norm.weight, norm.variance_epsilon)
    keys = linear(normed, attention.k_proj).view(-1, kv_heads, head_dim)
    values = linear(normed, attention.v_proj).view(-1, kv_heads, head_dim)
    output = torch.zeros(hidden.shape, dtype=torch.float64)
    for position in torch.nonzero(text).flatten().tolist():
        x = hidden[position].double()
        query = linear(x, attention.q_proj).view(heads, head_dim)
        attended = []
        for head in range(heads):
            kv_head = head // (heads // kv_heads)
            scores = keys[:, kv_head] @ query[head] / math.sqrt(head_dim)
            attended.append(torch.softmax(scores, dim=0) @ values[:, kv_head])
        gate = torch.tanh(linear(x, cross_attention.dynamic_gate))
        static = cross_attention.static_gate.double()
        output[position] = linear(torch.cat(attended), attention.o_proj) * gate * static
    return output


def expected_scene_tokens(teacher, inputs, plan, runs_per_video):
    """Per video, the scene tokens from `scene_boundaries` at the plan's threshold and
    max_scenes and `scene_tokens`, after checking that the cuts are the runs' ends (so the
    scene count is the number of runs) and that the tokens are the run means."""
    expected = []
    for frames, runs in zip(per_frame_features(teacher, inputs), runs_per_video, strict=True):
        cuts = scene_boundaries(frames, max_scenes=plan.max_scenes, tau=plan.scene_threshold)
        assert cuts == run_cuts(runs) and len(cuts) + 1 == len(runs)
        tokens = scene_tokens(frames, cuts).reshape(-1, frames.shape[-1])
        assert tokens.shape[0] == len(runs) * MERGED_TOKENS
        torch.testing.assert_close(tokens.double(), run_means(frames, runs), **TOLERANCE)
        expected.append(tokens)
    return expected


def video_batch(runs_per_video):
    """Model inputs for one video per sample, left-padded, with seeds 10, 11, ..."""
    return batch_inputs(
        [scene_video(runs, seed=10 + index) for index, runs in enumerate(runs_per_video)]
    )


def test_videos_cut_exactly_between_their_runs(teacher):
    """The premise of the other tests: at the plan's threshold tau, the teacher's vision
    features of adjacent frames (paper 000 eq. 8) are similar within a run and not across
    runs, so eq. 9 cuts exactly between runs; with -tau (the wrong sign) it would cut nowhere."""
    plan = resolve_plan(PRESET)
    inputs = video_batch(RUNS)
    videos = zip(per_frame_features(teacher, inputs), RUNS, SCENE_COUNTS, strict=True)
    for frames, runs, scene_count in videos:
        flat = frames.reshape(frames.shape[0], -1).double()
        similarity = torch.nn.functional.cosine_similarity(flat[:-1], flat[1:], dim=-1)
        across = torch.zeros(frames.shape[0] - 1, dtype=torch.bool)
        across[run_cuts(runs)] = True
        assert bool((similarity[~across] > 0.99).all()), similarity
        assert bool((similarity[across] < plan.scene_threshold - 0.3).all()), similarity
        assert bool((similarity[across] > -plan.scene_threshold).all()), similarity
        cuts = scene_boundaries(frames, max_scenes=plan.max_scenes, tau=plan.scene_threshold)
        assert cuts == run_cuts(runs)
        assert len(cuts) + 1 == scene_count


def test_mixers_receive_the_scene_tokens_of_one_video(teacher):
    """Every hybrid layer of a qwen-rwkv-vl student gets, for one video of 3 runs, the 3 scenes'
    tokens of paper 000 eq. 8-10 computed from the teacher's vision tower at the plan's tau and
    max_scenes (3 x 4 merged tokens, all real), and caches their keys (eq. 11)."""
    student = open_student(teacher)
    inputs = video_batch(RUNS[:1])
    (expected,) = expected_scene_tokens(teacher, inputs, student.plan, RUNS[:1])
    _, records = run_recording(student, inputs)
    for layer, record in records.items():
        context = record["context"]
        assert context.scene_tokens is not None, f"layer {layer} got no scene tokens"
        shape = (1, SCENE_COUNTS[0] * MERGED_TOKENS, expected.shape[-1])
        assert context.scene_tokens.shape == shape, layer
        torch.testing.assert_close(context.scene_tokens[0], expected, **TOLERANCE)
        assert context.scene_mask is None or bool(context.scene_mask.all()), layer
        state_mask = record["state"]["cross_attention.scene_mask"]
        assert state_mask.shape == shape[:2] and bool(state_mask.all()), layer


def test_mixers_receive_padded_and_masked_scene_tokens_of_a_batch(teacher):
    """A batch of two videos with 3 and 2 scenes: each hybrid layer gets (2, 12, D) scene
    tokens, sample 0's 12 real, sample 1's first 8 real (its 2 scenes) and the last 4 masked
    out; the real ones equal eq. 8-10 computed per video from the teacher's vision tower."""
    student = open_student(teacher)
    inputs = video_batch(RUNS)
    expected = expected_scene_tokens(teacher, inputs, student.plan, RUNS)
    counts = [tokens.shape[0] for tokens in expected]
    assert counts == [count * MERGED_TOKENS for count in SCENE_COUNTS]
    _, records = run_recording(student, inputs)
    for layer, record in records.items():
        context = record["context"]
        assert context.scene_tokens is not None, f"layer {layer} got no scene tokens"
        assert context.scene_tokens.shape[:2] == (2, max(counts)), layer
        assert context.scene_mask is not None, layer
        for sample, count in enumerate(counts):
            assert context.scene_mask[sample].tolist() == [True] * count + [False] * (
                max(counts) - count
            ), (layer, sample)
            torch.testing.assert_close(
                context.scene_tokens[sample, :count], expected[sample], **TOLERANCE
            )


@pytest.mark.parametrize("runs_per_video", [RUNS[:1], RUNS], ids=["one-video", "two-videos"])
def test_hybrid_layer_output_is_time_mix_plus_dense_gated_cross_attention(teacher, runs_per_video):
    """Each hybrid layer's output equals the RWKV-6 time mix of its input plus the gated
    cross-attention of paper 000 eq. 11-12 computed densely here (float64, one text token and
    head at a time, the teacher layer's W_Q/W_K/W_V/W_O and input_layernorm, the student's
    gates) over the scene tokens computed directly from the teacher's vision tower, each
    sample over its own real scenes only; its cached scene keys are W_K norm(V_s). The
    cross-attention part is checked to be a sizeable share of the output (gates open)."""
    student = open_student(teacher)
    inputs = video_batch(runs_per_video)
    expected = expected_scene_tokens(teacher, inputs, student.plan, runs_per_video)
    _, records = run_recording(student, inputs)
    text = inputs["attention_mask"].bool() & (inputs["mm_token_type_ids"] == 0)
    config = teacher.config.text_config
    kv_heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    mixers = hybrid_mixers(student)
    for layer, record in records.items():
        mixer = mixers[layer]
        with torch.no_grad():
            time_mix, _ = mixer.time_mix(record["hidden"], record["context"])
        keys = record["state"]["cross_attention.scene_keys"]
        for sample, scenes in enumerate(expected):
            hidden = record["hidden"][sample]
            branch = dense_branch(
                teacher, layer, mixer.cross_attention, hidden, text[sample], scenes
            )
            assert branch[text[sample]].norm() > 0.05 * time_mix[sample].norm(), (layer, sample)
            reference = time_mix[sample].double() + branch
            torch.testing.assert_close(
                record["output"][sample].double(), reference, **TOLERANCE, msg=f"layer {layer}"
            )
            norm = teacher.model.language_model.layers[layer].input_layernorm
            normed = rms_norm(scenes.double(), norm.weight, norm.variance_epsilon)
            key_weights = teacher.model.language_model.layers[layer].self_attn.k_proj
            dense_keys = linear(normed, key_weights).view(-1, kv_heads, head_dim).transpose(0, 1)
            torch.testing.assert_close(
                keys[sample, :, : scenes.shape[0]].double(), dense_keys, **TOLERANCE
            )


def test_plan_max_scenes_and_threshold_choose_the_cuts(teacher):
    """The model cuts scenes with its plan's own max_scenes and scene_threshold (paper 000
    eq. 9: the K = max_scenes - 1 least similar adjacent frames below tau): for the 3-run
    video, max_scenes 2 keeps only the least similar of the two run cuts, and a threshold
    between the two cuts' similarities keeps only the cut below it; either way the mixers get
    the 2 scenes' means (eq. 10) computed here."""
    preset = resolve_plan(PRESET)
    inputs = video_batch(RUNS[:1])
    (frames,) = per_frame_features(teacher, inputs)
    flat = frames.reshape(frames.shape[0], -1).double()
    similarity = torch.nn.functional.cosine_similarity(flat[:-1], flat[1:], dim=-1)
    first, second = run_cuts(RUNS[0])
    low, high = sorted((similarity[first].item(), similarity[second].item()))
    assert high - low > 0.02 and high < preset.scene_threshold
    least_similar = first if similarity[first] < similarity[second] else second
    plans = {
        "max_scenes": dataclasses.replace(preset, max_scenes=2),
        "scene_threshold": dataclasses.replace(preset, scene_threshold=(low + high) / 2),
    }
    for name, plan in plans.items():
        student = open_student(teacher, plan)
        assert student.plan == plan, name
        end = least_similar + 1
        runs = (end, frames.shape[0] - end)
        expected = run_means(frames, runs)
        cuts = scene_boundaries(frames, max_scenes=plan.max_scenes, tau=plan.scene_threshold)
        assert cuts == [least_similar], name
        _, records = run_recording(student, inputs)
        for layer, record in records.items():
            tokens = record["context"].scene_tokens
            assert tokens is not None and tokens.shape[1] == 2 * MERGED_TOKENS, (name, layer)
            torch.testing.assert_close(tokens[0].double(), expected, **TOLERANCE)


def test_scene_branch_moves_the_logits(teacher):
    """With the gates open the scene branch reaches the logits; with every static gate back
    at 0 (paper 000 eq. 12, g_s's init) each hybrid layer's output is exactly its time mix and
    the logits change."""
    student = open_student(teacher)
    inputs = video_batch(RUNS)
    opened, _ = run_recording(student, inputs)
    mixers = hybrid_mixers(student)
    with torch.no_grad():
        for mixer in mixers.values():
            mixer.cross_attention.static_gate.zero_()
    closed, records = run_recording(student, inputs)
    for layer, record in records.items():
        with torch.no_grad():
            time_mix, _ = mixers[layer].time_mix(record["hidden"], record["context"])
        torch.testing.assert_close(record["output"], time_mix, rtol=0, atol=0)
    assert not torch.allclose(opened, closed, atol=1e-3)


def test_decoding_from_cached_scenes_equals_one_full_forward(teacher):
    """Prefill of the two-video batch (scenes of 3 and 2 runs, left padding) then three text
    tokens decoded one at a time with the cache, gates open: the decoding steps attend to the
    scenes the prefill cached and give the logits of one full forward (whose hybrid layers
    the test above checks against eq. 11-12)."""
    student = open_student(teacher)
    decode_steps = 3
    inputs = batch_inputs(
        [
            scene_video(runs, seed=10 + index, suffix=(6, 7, 8, 9, 10, 11))
            for index, runs in enumerate(RUNS)
        ]
    )
    positions, _ = student.model.get_rope_index(
        inputs["input_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    prefill = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        prefill[key] = inputs[key][:, :-decode_steps]
    with torch.no_grad():
        full = student(**inputs, use_cache=False).logits
        output = student(**prefill, use_cache=True)
        cache = output_cache(output)
        logits = [output.logits]
        length = prefill["input_ids"].shape[1]
        for position in range(length, length + decode_steps):
            output = student(
                input_ids=inputs["input_ids"][:, position : position + 1],
                attention_mask=inputs["attention_mask"][:, : position + 1],
                position_ids=positions[:, :, position : position + 1],
                **cache_keyword(cache),
                use_cache=True,
            )
            logits.append(output.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-4, atol=1e-4)
