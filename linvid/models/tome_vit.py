"""Token merging inside a SigLIP vision tower: AuroraLong's "Sorted Token Merge" (paper 001
§3.1-3.2, Algorithm 1 and eq. 2), as a small reversible patch in the style of ToMe's
`tome.patch.timm`.

`apply_tome(vision_model)` swaps the classes of four kinds of modules of a transformers SigLIP
vision model (`SiglipVisionModel`, also the vision tower of LLaVA-OneVision-style VLMs) for
subclasses that share one dict, `vision_model.tome_state`:

- the encoder: at the start of every forward, computes the per-layer merge schedule from the
  token count and resets the sizes;
- every encoder layer: x = x + attention(ln1(x)) with log(size) added to the logits (eq. 2),
  then, in all but the last `skip_last` layers ("V[:N-2]"), merge r tokens by bipartite soft
  matching on the attention keys averaged over heads, size-weighted average, sizes tracked,
  tokens ordered by size; then x = x + mlp(ln2(x));
- every layer's attention: the same computation as SigLIP's, plus it hands its keys to the
  layer and accepts the log(size) bias as an additive attention mask (eager or SDPA);
- the pooling head (if the model has one): the probe attends to the merged tokens with the
  same log(size) bias, so it sees a token of size s as s copies.

`remove_tome(vision_model)` swaps the original classes back; outputs are then bit-identical to
a never-patched model. The matching, merging and ordering are `linvid.ops.tome`'s; this
module only decides where they run.

State after a forward: `tome_state["schedule"]` (r per layer), `["size"]` (B, M) patches per
output token, `["merges"]` the `TokenMerge` of every merging layer in order (replay them on
anything laid out like that layer's tokens); `patch_to_token_merge` composes them into one
merge from the input patches to the output tokens.
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.siglip.modeling_siglip import eager_attention_forward

from linvid.ops.tome import (
    ORDERS,
    TokenMerge,
    bipartite_soft_matching,
    proportional_attention_bias,
)
from linvid.ops.validation import check_positive_int

# AuroraLong's language stage keeps 10% of the visual tokens (paper 001 §3.3 and Table 1).
DEFAULT_KEEP_RATIO = 0.1
# Attention implementations that accept an additive float mask (the log(size) bias).
BIAS_IMPLEMENTATIONS = ("eager", "sdpa")


def merge_schedule(
    tokens: int,
    num_layers: int,
    *,
    keep_ratio: float | None = None,
    r: int | None = None,
    protected: int = 0,
    skip_last: int = 2,
) -> list[int]:
    """Tokens merged by each of `num_layers` encoder layers for an input of `tokens` tokens.

    Only the first `num_layers - skip_last` layers merge (paper 001 Algorithm 1 loops over
    V[:N-2]); a layer merges at most half of its mergeable tokens (those after the first
    `protected`), as bipartite matching can. With `r`, every merging layer merges
    min(r, that cap). With `keep_ratio` (default 0.1 when neither is given) the target is
    ceil(keep_ratio * tokens) tokens after the merging layers, and r is the smallest constant
    for which the layers reach it, each merging min(r, its cap, what is left to the target);
    when the caps make the target unreachable (too few merging layers), every merging layer
    merges its cap. Returns a list of `num_layers` ints; the last `skip_last` are 0.
    """
    keep_ratio, r = _resolve_amount(keep_ratio, r)
    check_positive_int("tokens", tokens)
    check_positive_int("num_layers", num_layers)
    check_positive_int("protected", protected, allow_zero=True)
    check_positive_int("skip_last", skip_last, allow_zero=True)
    if protected > tokens:
        raise ValueError(f"protected must be <= the number of tokens {tokens}, got {protected}")
    merging_layers = max(num_layers - skip_last, 0)
    if r is not None:
        steps = _merge_steps(tokens, merging_layers, r, protected, target=0)
    else:
        # Round first so that e.g. 0.1 * 70 = 7.000000000000001 targets 7 tokens, not 8.
        target = math.ceil(round(keep_ratio * tokens, 6))
        needed = tokens - target
        lowest = -(-needed // merging_layers) if merging_layers else 0
        for constant in range(lowest, max(lowest, (tokens - protected) // 2) + 1):
            steps = _merge_steps(tokens, merging_layers, constant, protected, target)
            if sum(steps) == needed:
                break
    return steps + [0] * (num_layers - merging_layers)


def _merge_steps(tokens: int, layers: int, r: int, protected: int, target: int) -> list[int]:
    """Greedy per-layer merges: min(r, half the mergeable tokens, tokens above target)."""
    steps = []
    for _ in range(layers):
        step = min(r, (tokens - protected) // 2, tokens - target)
        steps.append(step)
        tokens -= step
    return steps


def _resolve_amount(keep_ratio, r) -> tuple[float | None, int | None]:
    """Validate the two ways of saying how much to merge; exactly one is used."""
    if keep_ratio is not None and r is not None:
        raise ValueError(f"give keep_ratio or r, not both; got keep_ratio={keep_ratio!r}, r={r!r}")
    if r is not None:
        check_positive_int("r", r, allow_zero=True)
        return None, r
    if keep_ratio is None:
        return DEFAULT_KEEP_RATIO, None
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, Real) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    return float(keep_ratio), None


def apply_tome(
    vision_model: nn.Module,
    *,
    keep_ratio: float | None = None,
    r: int | None = None,
    order: str = "ascending",
    protected: int = 0,
    skip_last: int = 2,
) -> nn.Module:
    """Patch a SigLIP vision model in place to merge tokens in its encoder (paper 001 §3.1-3.2,
    Algorithm 1; proportional attention eq. 2). Returns the same model.

    vision_model: a module with `.encoder.layers`, each with `layer_norm1`, `self_attn`
    (q/k/v/out projections), `layer_norm2`, `mlp` (e.g. `SiglipVisionModel`), and optionally a
    pooling `.head`. Pixel values (B, 3, H, W) give N = (H / patch) * (W / patch) tokens; the
    outputs then have M = N - sum(schedule) tokens: last_hidden_state (B, M, D), hidden_states
    with each layer's own token count, pooler_output (B, D).

    keep_ratio (default 0.1 when r is not given) or a constant r per merging layer sets the
    schedule (see `merge_schedule`); `order` ("ascending": never-merged tokens first, the
    paper's choice; "descending"; "none": ToMe's order) orders each layer's output by size;
    the first `protected` tokens (a class token) never merge; the last `skip_last` layers do
    not merge (they still use proportional attention). Calling it on a patched model replaces
    the settings. Training works; gradient checkpointing does not (a recomputed layer would
    advance the shared per-forward state twice), and a forward in training mode with it
    enabled raises ValueError.
    """
    keep_ratio, r = _resolve_amount(keep_ratio, r)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    check_positive_int("protected", protected, allow_zero=True)
    check_positive_int("skip_last", skip_last, allow_zero=True)
    encoder = _checked_encoder(vision_model)
    if hasattr(vision_model, "tome_state"):
        remove_tome(vision_model)

    state = {
        "keep_ratio": keep_ratio,
        "r": r,
        "order": order,
        "protected": protected,
        "skip_last": skip_last,
        # Filled by every forward.
        "schedule": [],
        "size": None,
        "merges": [],
        "next_layer": 0,
    }
    targets = [(encoder, _ToMeEncoder)]
    for layer in encoder.layers:
        targets += [(layer, _ToMeEncoderLayer), (layer.self_attn, _ToMeAttention)]
    head = getattr(vision_model, "head", None)
    if isinstance(getattr(head, "attention", None), nn.MultiheadAttention) and hasattr(
        head, "probe"
    ):
        targets.append((head, _ToMePoolingHead))
    for module, mixin in targets:
        module.__class__ = _patched_class(mixin, type(module))
        module._tome_state = state
    vision_model.tome_state = state
    return vision_model


def remove_tome(vision_model: nn.Module) -> nn.Module:
    """Undo `apply_tome`: restore the original classes and drop the shared state. Returns the
    same model, whose outputs are then bit-identical to those of a never-patched model."""
    if not hasattr(vision_model, "tome_state"):
        raise ValueError(
            f"{type(vision_model).__name__} has no ToMe patch to remove (apply_tome was not called)"
        )
    for module in vision_model.modules():
        if "_tome_state" in module.__dict__:
            module.__class__ = module.__class__.__bases__[1]
            del module._tome_state
    del vision_model.tome_state
    return vision_model


def patch_to_token_merge(vision_model: nn.Module) -> TokenMerge:
    """The merge from the input patches to the output tokens of the last forward, composed
    over all merging layers (paper 001 Algorithm 1 applied N-2 times).

    destination: (B, N) output token of every input patch; input_size: (B, N) ones; size:
    (B, M). E.g. `.merge(patch_index, "amin")` gives each token's first patch, `.unmerge(out)`
    paints (B, M, ...) token features back onto the (B, N, ...) patches.
    """
    state = getattr(vision_model, "tome_state", None)
    if state is None or state["size"] is None:
        raise ValueError("patch_to_token_merge needs a model patched by apply_tome and run once")
    if not state["merges"]:
        batch, tokens = state["size"].shape
        identity = torch.arange(tokens, device=state["size"].device).repeat(batch, 1)
        return TokenMerge(destination=identity, input_size=state["size"], size=state["size"])
    merges = state["merges"]
    destination = merges[0].destination
    for merge in merges[1:]:
        destination = merge.destination.gather(1, destination)
    return TokenMerge(
        destination=destination, input_size=merges[0].input_size, size=merges[-1].size
    )


def _checked_encoder(vision_model: nn.Module) -> nn.Module:
    """The encoder of a SigLIP-style vision model, or a ValueError saying what was expected."""
    encoder = getattr(vision_model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    layer_parts = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
    attention_parts = ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scale", "config")
    if (
        not isinstance(layers, nn.ModuleList)
        or len(layers) == 0
        or not all(hasattr(layer, part) for layer in layers for part in layer_parts)
        or not all(hasattr(layer.self_attn, part) for layer in layers for part in attention_parts)
    ):
        raise ValueError(
            "vision_model must be a SigLIP vision model (e.g. SiglipVisionModel, or a VLM's "
            "vision tower such as model.vision_tower) whose .encoder.layers have layer_norm1, "
            f"self_attn, layer_norm2 and mlp; got {type(vision_model).__name__}"
        )
    return encoder


def _size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log(size) as (B, 1, 1, N) in `dtype` (SDPA wants the mask in the query dtype), with
    the log taken in at least float32 and in float64 for a float64 model."""
    return proportional_attention_bias(size.to(torch.promote_types(size.dtype, dtype))).to(dtype)


@functools.cache
def _patched_class(mixin: type, base: type) -> type:
    """`base` with `mixin`'s forward in front; `__bases__[1]` gives the original back."""
    return type(f"ToMe{base.__name__}", (mixin, base), {})


class _ToMeEncoder:
    """Starts a forward: the schedule for this token count, sizes of one, no merges yet."""

    def forward(self, inputs_embeds: torch.Tensor, attention_mask=None, **kwargs):
        state = self._tome_state
        batch, tokens = inputs_embeds.shape[:2]
        state["schedule"] = merge_schedule(
            tokens,
            len(self.layers),
            keep_ratio=state["keep_ratio"],
            r=state["r"],
            protected=state["protected"],
            skip_last=state["skip_last"],
        )
        if self.training and any(
            getattr(layer, "gradient_checkpointing", False) for layer in self.layers
        ):
            # A recomputed layer would advance the shared per-forward state a second time.
            raise ValueError(
                "ToMe in the vision tower does not support gradient checkpointing; call "
                "vision_model.activation_checkpointing_disable() or remove_tome(vision_model)"
            )
        implementation = self.config._attn_implementation
        if any(state["schedule"]) and implementation not in BIAS_IMPLEMENTATIONS:
            raise ValueError(
                f"proportional attention adds log(size) to the attention logits, which needs "
                f"attn_implementation in {BIAS_IMPLEMENTATIONS}, got {implementation!r}; call "
                "vision_model.set_attn_implementation('sdpa')"
            )
        state["size"] = torch.ones(batch, tokens, dtype=torch.float32, device=inputs_embeds.device)
        state["merges"] = []
        state["next_layer"] = 0
        return super().forward(inputs_embeds, attention_mask, **kwargs)


class _ToMeEncoderLayer:
    """SigLIP's pre-norm layer with a merge between the attention and the MLP (Algorithm 1)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        """hidden_states: (B, N, D) -> (B, N - r, D) with r = this layer's schedule entry."""
        if attention_mask is not None:
            # A per-patch mask (padded patches) would have to be merged along with the tokens.
            raise ValueError(
                "ToMe in the vision tower does not support an attention mask over patches; "
                f"got one of shape {tuple(attention_mask.shape)}"
            )
        state = self._tome_state
        r = state["schedule"][state["next_layer"]]
        state["next_layer"] += 1
        # Until the first merge every size is 1 and the bias is a no-op: skip it so that an
        # unmerged forward runs exactly SigLIP's computation.
        bias = None
        if state["merges"]:
            bias = _size_bias(state["size"], hidden_states.dtype)

        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, attention_mask=bias, **kwargs
        )
        hidden_states = residual + hidden_states
        keys = state.pop("keys")  # (B, N, head_dim): the merge metric, keys averaged over heads
        if r > 0:
            merge = bipartite_soft_matching(
                keys, r, size=state["size"], order=state["order"], protected=state["protected"]
            )
            hidden_states = merge.average(hidden_states)
            state["size"] = merge.size
            state["merges"].append(merge)

        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class _ToMeAttention:
    """SigLIP attention that also leaves its keys, averaged over heads, in the shared state;
    the layer passes the log(size) bias as `attention_mask` (paper 001 eq. 2)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        """hidden_states: (B, N, D); attention_mask: None or (B, 1, 1, N) additive bias.
        Returns ((B, N, D), attention weights or None) like SiglipAttention."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, N, d)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        self._tome_state["keys"] = keys.mean(dim=1)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            queries,
            keys,
            values,
            attention_mask,
            is_causal=self.is_causal,
            scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


class _ToMePoolingHead:
    """SigLIP's attention-pooling head with proportional attention over merged tokens."""

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """hidden_state: (B, M, D) -> pooled (B, D)."""
        state = self._tome_state
        if not state["merges"]:
            return super().forward(hidden_state)
        batch, tokens = state["size"].shape
        heads = self.attention.num_heads
        # nn.MultiheadAttention takes a per-head float mask laid out (B * heads, queries, keys).
        bias = _size_bias(state["size"], hidden_state.dtype)
        bias = bias.expand(batch, heads, 1, tokens).reshape(batch * heads, 1, tokens)
        probe = self.probe.repeat(batch, 1, 1)
        pooled = self.attention(probe, hidden_state, hidden_state, attn_mask=bias)[0]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]
