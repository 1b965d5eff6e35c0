"""TransV inside a tiny Qwen2.5-VL teacher against an outside reference (paper 002 §3.2, eq. 5-6).

The reference is the same model run as an explicit loop written here: the model's own
transformers decoder layers called one by one on one sample at a time (no padding, an explicit
causal mask, rotary embeddings from the model's rotary module at each token's own position), and
at each TransV layer the kept vision tokens chosen by hand from the paper's rule (eq. 5: evenly
spaced for "uniform", the most attended by the last instruction token for "attention", that
attention computed densely from the layer's q/k projections), the transfer into the instruction
tokens computed densely from the TransV module's weights (eq. 6, not its forward), then the final
RMSNorm and lm_head. Everything runs in float64 on weights far from init (so the attention
scores are well separated and a wrong token changes the output visibly).

The model's forward is compared with it at three places: the hidden states entering every
decoder layer, the positions the cache records as kept, and the last hidden state and logits.
"""

import copy
import math

import pytest
import torch
from qwen_inputs import batch_inputs, video_sample
from transformers import Qwen2_5_VLForConditionalGeneration

from linvid.models.cache import output_cache
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.transv import apply_transv

LAYERS = 4
PAPER_LIKE = (  # paper 002 §4.1: uniform p = 0.5 at a shallow layer, attention p = 0.9 deeper
    {"layer": 1, "drop": 0.5, "mode": "uniform"},
    {"layer": 3, "drop": 0.9, "mode": "attention"},
)
UNEVEN = (  # the other order, with rates whose uniform spacing is uneven
    {"layer": 1, "drop": 0.6, "mode": "attention"},
    {"layer": 2, "drop": 0.4, "mode": "uniform"},
)
ALPHAS = (0.7, -0.5)  # tanh(alpha) of the first and second TransV point: both signs
CASES = {
    "one video": (PAPER_LIKE, [video_sample(frames=8, suffix=(6, 7, 8, 9, 10, 11), seed=1)], 0),
    # 32 and 16 vision tokens, left padding: samples drop different numbers of tokens.
    "padded batch of two": (
        PAPER_LIKE,
        [
            video_sample(frames=8, suffix=(6, 7, 8, 9, 10, 11), seed=1),
            video_sample(frames=4, prefix=(3, 4, 5, 9, 10), suffix=(9, 8, 7, 6, 5, 4), seed=2),
        ],
        0,
    ),
    # Teacher forcing: the last 3 tokens are the response (no transfer into them, and the
    # attention query is the last prompt token). Sample 0 keeps its last vision token at the
    # attention layer (checked in `case`): the instruction starts right after a kept token.
    "batch of two with a response": (
        UNEVEN,
        [
            video_sample(frames=8, suffix=(6, 7, 8, 9, 10, 11, 12), seed=5),
            video_sample(frames=8, suffix=(12, 11, 10, 9, 8, 7, 6), seed=105),
        ],
        3,
    ),
}
SCORE_MARGIN = 1e-5  # the kept and the dropped attention scores must be at least this apart
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # transformers' RMSNorm computes in float32


@pytest.fixture(scope="module")
def teacher():
    """A float64 tiny teacher whose language model weights are far from init: projections and
    embeddings of std 0.15, norm weights around 1, so attention is sharp and norms matter."""
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=LAYERS))
    model = model.to(torch.float64).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        parameters = [
            *model.model.language_model.named_parameters(),
            *model.lm_head.named_parameters(),
        ]
        for name, parameter in parameters:
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model


def with_transv(teacher, schedule):
    """The teacher with TransV at `schedule`, tanh gates open (ALPHAS) and the cross-attention
    weights moved away from the layer's attention they were copied from."""
    model = apply_transv(copy.deepcopy(teacher), list(schedule))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for alpha, module in zip(ALPHAS, model.model.language_model.transv.values(), strict=True):
            module.alpha.fill_(alpha)
            for name, parameter in module.named_parameters():
                if name != "alpha":
                    noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                    parameter.add_(0.1 * noise)
    return model.eval()


def language_model_inputs(teacher, inputs):
    """(inputs_embeds (B, L, D), position_ids (3, B, L)) that the plain teacher's Qwen2.5-VL
    forward hands its language model: vision features merged in, M-RoPE positions."""
    seen = {}
    text_model = teacher.model.language_model
    handle = text_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    with torch.no_grad():
        teacher(**inputs, use_cache=False)
    handle.remove()
    return seen["inputs_embeds"], seen["position_ids"]


def linear(x, layer):
    """x @ W^T + b of an nn.Linear, densely."""
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def rms_norm(x, norm):
    """x / sqrt(mean(x^2) + eps) * weight (Qwen2.5-VL's RMSNorm), densely in float64."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def rotate(x, cos, sin):
    """Rotary embedding x cos + rotate_half(x) sin on the last dimension (head_dim)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def last_token_attention(layer, hidden, cos, sin, config):
    """(n,) Attn(X_T1, X) of paper 002 eq. 5: the attention weights of the last of the n tokens
    in `hidden` (n, D) to all n, from the layer's own q/k projections and rotary embeddings,
    softmax over the n keys, mean over heads."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    normed = rms_norm(hidden, layer.input_layernorm)
    query = linear(normed[-1], layer.self_attn.q_proj).view(heads, head_dim)
    keys = linear(normed, layer.self_attn.k_proj).view(-1, kv_heads, head_dim)
    query = rotate(query, cos[-1], sin[-1])
    keys = rotate(keys, cos[:, None], sin[:, None]).repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.einsum("hd,nhd->hn", query, keys) / math.sqrt(head_dim)
    return logits.softmax(dim=-1).mean(dim=0)


def cross_attention_transfer(module, norm, instruction, dropped):
    """tanh(alpha) CrossAttn(X_1, TD(X_0)) of paper 002 eq. 6, densely from the module's weights:
    queries from the instruction tokens (m, D), keys and values from the dropped vision tokens
    (k, D), both through the layer's input norm; grouped heads, scale 1/sqrt(head_dim), no
    rotary embedding."""
    heads, kv_heads, head_dim = module.num_heads, module.num_key_value_heads, module.head_dim
    queries = linear(rms_norm(instruction, norm), module.query).view(-1, heads, head_dim)
    normed = rms_norm(dropped, norm)
    keys = linear(normed, module.key).view(-1, kv_heads, head_dim)
    values = linear(normed, module.value).view(-1, kv_heads, head_dim)
    keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    values = values.repeat_interleave(heads // kv_heads, dim=1)
    weights = (torch.einsum("mhd,khd->hmk", queries, keys) / math.sqrt(head_dim)).softmax(-1)
    attended = torch.einsum("hmk,khd->mhd", weights, values).reshape(instruction.shape[0], -1)
    return torch.tanh(module.alpha) * linear(attended, module.output)


def kept_vision_slots(point, module, layer, hidden, cos, sin, vision, prompt, config):
    """Indices, among the current sequence, of the vision tokens TransV keeps (paper 002 eq. 5):
    T_d = floor(p T_0) dropped; "uniform" keeps the evenly spaced floor(j T_0 / K), j < K =
    T_0 - T_d; "attention" keeps the K most attended by the last prompt token."""
    slots = torch.nonzero(vision).flatten()
    count = slots.numel()
    keep = count - math.floor(point["drop"] * count)
    if point["mode"] == "uniform":
        return slots[[j * count // keep for j in range(keep)]]
    scores = last_token_attention(layer, hidden[:prompt], cos[:prompt], sin[:prompt], config)
    scores = scores[slots]
    ranked = scores.sort(descending=True).values
    # Well-separated scores: float32 score arithmetic inside linvid cannot flip the choice.
    assert float(ranked[keep - 1] - ranked[keep]) > SCORE_MARGIN
    return slots[scores.argsort(descending=True)[:keep].sort().values]


def reference_loop(model, schedule, embeds, positions, vision, response):
    """One sample through the explicit loop. embeds (n, D), positions (3, n), vision (n,) bool,
    response: how many of the last tokens are response tokens.
    Returns {"layer_inputs": {layer: (kept (n_l,) input positions, hidden (n_l, D))},
    "kept": {TransV layer: kept positions}, "hidden": final normed (n', D), "logits"}."""
    text_model = model.model.language_model
    config = text_model.config
    points = {point["layer"]: point for point in schedule}
    cos, sin = text_model.rotary_emb(embeds[None], positions[:, None])
    cos, sin = cos[0], sin[0]  # (n, head_dim), each token's own position
    kept = torch.arange(embeds.shape[0])  # input positions of the tokens still in the sequence
    hidden = embeds
    trace = {"layer_inputs": {}, "kept": {}}
    for index, layer in enumerate(text_model.layers):
        if index in points:
            module = text_model.transv[str(index)]
            here = vision[kept]
            prompt = hidden.shape[0] - response
            chosen = kept_vision_slots(
                points[index], module, layer, hidden, cos[kept], sin[kept], here, prompt, config
            )
            dropped = here.clone()
            dropped[chosen] = False
            instruction = torch.zeros_like(here)
            instruction[int(torch.nonzero(here).max()) + 1 : prompt] = True
            transfer = cross_attention_transfer(
                module, layer.input_layernorm, hidden[instruction], hidden[dropped]
            )
            hidden = hidden.clone()
            hidden[instruction] = hidden[instruction] + transfer
            stays = ~dropped
            hidden, kept = hidden[stays], kept[stays]
            trace["kept"][index] = kept
        trace["layer_inputs"][index] = (kept, hidden)
        length = hidden.shape[0]
        causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        hidden = layer(
            hidden[None],
            attention_mask=causal,
            position_embeddings=(cos[kept][None], sin[kept][None]),
            use_cache=False,
        )[0]
    trace["hidden"] = rms_norm(hidden, text_model.norm)
    trace["logits"] = linear(trace["hidden"], model.lm_head)
    return trace


def references(teacher, model, schedule, inputs, response):
    """reference_loop for every sample of a left-padded batch, on its real tokens only.
    Returns one trace per sample, with its left padding `pad`."""
    embeds, positions = language_model_inputs(teacher, inputs)
    traces = []
    for sample, real in enumerate(inputs["attention_mask"].bool()):
        vision = inputs["mm_token_type_ids"][sample, real] > 0
        trace = reference_loop(
            model, schedule, embeds[sample, real], positions[:, sample, real], vision, response
        )
        trace["pad"] = int((~real).sum())
        traces.append(trace)
    return traces


def model_run(model, inputs, response):
    """The TransV model's forward: logits, the language model's last hidden state, the hidden
    states entering every decoder layer (use_cache=False), and the cache's kept positions (a
    second call with use_cache=True)."""
    text_model = model.model.language_model
    run = {"layer_inputs": {}}
    handles = [
        layer.register_forward_pre_hook(
            lambda _, args, index=index: run["layer_inputs"].__setitem__(index, args[0])
        )
        for index, layer in enumerate(text_model.layers)
    ]
    handles.append(
        text_model.register_forward_hook(
            lambda _, args, output: run.__setitem__("hidden", output.last_hidden_state)
        )
    )
    extra = {}
    if response:
        extra["transv_prompt_length"] = inputs["input_ids"].shape[1] - response
    try:
        with torch.no_grad():
            run["logits"] = model(**inputs, use_cache=False, **extra).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        run["kept"] = output_cache(model(**inputs, use_cache=True, **extra)).transv_kept
    return run


@pytest.fixture(scope="module", params=list(CASES))
def case(request, teacher):
    """(the TransV model's run, the reference traces) for one entry of CASES."""
    schedule, samples, response = CASES[request.param]
    inputs = batch_inputs(samples)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.float64)
    model = with_transv(teacher, schedule)
    with torch.no_grad():
        traces = references(teacher, model, schedule, inputs, response)
    if request.param == "batch of two with a response":
        last_vision = int(torch.nonzero(inputs["mm_token_type_ids"][0]).max())
        assert last_vision in traces[0]["kept"][schedule[0]["layer"]].tolist()
    return model_run(model, inputs, response), traces


def scattered(trace, length):
    """The reference's final values at their input positions of the padded row: (length, ...)
    zeros where a token was dropped or is padding (the model's convention for logits)."""
    logits = trace["logits"]
    full = logits.new_zeros(length, logits.shape[-1])
    full[trace["pad"] + trace["layer_inputs"][LAYERS - 1][0]] = logits
    return full


def test_reference_loop_without_transv_reproduces_the_teacher(teacher):
    """The reference loop itself (layers one by one, hand-built causal mask and rotary
    embeddings, final norm and lm_head by hand), with no TransV point, gives the plain
    teacher's logits: the outside reference is sound before it judges TransV."""
    inputs = batch_inputs(CASES["padded batch of two"][1])
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.float64)
    with torch.no_grad():
        expected = teacher(**inputs, use_cache=False).logits
        traces = references(teacher, teacher, (), inputs, response=0)
    for sample, trace in enumerate(traces):
        pad = trace["pad"]
        torch.testing.assert_close(expected[sample, pad:], trace["logits"], **TOLERANCE)


def test_kept_positions_follow_the_paper_rule(case):
    """The cache's record of kept input positions at each TransV layer equals the tokens the
    reference keeps by eq. 5 (every text token; evenly spaced or most attended vision tokens)."""
    run, traces = case
    assert sorted(run["kept"]) == sorted(traces[0]["kept"])
    for layer, record in run["kept"].items():
        for sample, trace in enumerate(traces):
            row = record[sample]
            real = row[row >= trace["pad"]] - trace["pad"]
            assert real.tolist() == trace["kept"][layer].tolist(), (layer, sample)


def test_every_decoder_layer_sees_the_reference_hidden_states(case):
    """The hidden states entering every decoder layer (after the gather and the eq. 6 transfer at
    a TransV layer) equal the reference's: each sample's tokens are right-aligned, so its kept
    tokens are the last rows of the (B, L', D) batch."""
    run, traces = case
    for layer, batch_hidden in run["layer_inputs"].items():
        for sample, trace in enumerate(traces):
            _, expected = trace["layer_inputs"][layer]
            actual = batch_hidden[sample, -expected.shape[0] :]
            torch.testing.assert_close(actual, expected, **TOLERANCE, msg=f"layer {layer}")


def test_last_hidden_state_is_the_final_norm_of_the_layer_loop(case):
    """The language model's last hidden state at each kept input position is the reference's
    final RMSNorm output; positions of dropped tokens hold zeros."""
    run, traces = case
    hidden = run["hidden"]
    for sample, trace in enumerate(traces):
        expected = hidden.new_zeros(hidden.shape[1:])
        expected[trace["pad"] + trace["layer_inputs"][LAYERS - 1][0]] = trace["hidden"]
        pad = trace["pad"]
        torch.testing.assert_close(hidden[sample, pad:], expected[pad:], **TOLERANCE)


def test_logits_match_the_reference_loop(case):
    """The model's logits (B, L, vocab) equal lm_head(norm(...)) of the reference loop at every
    kept input position of every sample, and zeros at dropped positions."""
    run, traces = case
    logits = run["logits"]
    for sample, trace in enumerate(traces):
        pad = trace["pad"]
        expected = scattered(trace, logits.shape[1])
        torch.testing.assert_close(logits[sample, pad:], expected[pad:], **TOLERANCE)
