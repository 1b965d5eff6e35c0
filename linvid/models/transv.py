"""TransV inside a Qwen2.5-VL language model (paper 002 §3.2 and §4.1): a schedule of decoder
layers at which vision tokens are dropped and transferred into the instruction tokens, and the
decoder loop that runs every later layer on the shorter sequence.

`apply_transv(model, schedule)` patches a teacher or a linvid student in place:
- the language model's class becomes `TransVTextModel`, whose forward runs the layers in
  segments between TransV points; the causal mask is rebuilt per segment from the cache's own
  per-layer sizes, and the rotary embeddings of the kept tokens are gathered (kept tokens keep
  their own positions);
- a forward pre-hook on the model tells the language model which tokens are vision tokens
  (from mm_token_type_ids, or from the placeholder ids with their grids);
- a student's config records the schedule (`linvid_transv`), so save/load rebuilds it.

Calls without vision tokens to drop, and caches in which nothing was dropped, run transformers'
own forward unchanged (so p = 0 is bit-identical to the model without TransV).
`set_transv_enabled(model, False)` makes every TransV point drop nothing (that same forward, the
TransV parameters unused, e.g. for a training stage that runs without token compression) until
`set_transv_enabled(model, True)`; a fresh or loaded model starts enabled.

Batches may be left-padded and their samples may hold different numbers of vision tokens: after
a TransV point every sample is right-aligned again, the ones that dropped fewer tokens getting
new left padding, and the cache keeps each segment's 2D padding mask (`transv_masks`) so that
decoding builds the same masks. Limits: the vision tokens and their instruction come in one
prefill call; no sliding-window layers; no beam search (the per-segment records are not
reordered); M-MATE layers after a TransV point are refused (a video with tokens dropped is no
longer a (T, H, W) grid).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLTextModel,
    apply_rotary_pos_emb,
)

from linvid.layers.base import MixerContext
from linvid.layers.transv import MODES, TransV, check_drop, dropped_count
from linvid.models.cache import cache_keyword, given_cache
from linvid.models.mixer_attention import MixerAttention

INITS = ("transfer", "random")


@dataclass(frozen=True)
class TransVPoint:
    """One TransV: before decoder layer `layer`, drop a fraction `drop` (p) of the vision tokens,
    evenly spaced ("uniform") or the least attended by the last token ("attention")."""

    layer: int
    drop: float
    mode: str = "uniform"

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"TransV layer must be an int, got {self.layer!r}")
        check_drop(self.drop)
        if self.mode not in MODES:
            raise ValueError(f"unknown TransV mode {self.mode!r}; expected one of {MODES}")


def paper_schedule(
    num_layers: int, attention_layers: tuple[int, ...] | None = None
) -> tuple[TransVPoint, ...]:
    """Paper 002 §4.1 scaled to `num_layers`: uniform p = 0.5 at 7/56 of the depth and
    attention-guided p = 0.9 at the attention layer nearest to 39/56 of it (both rounded down;
    the deeper of two equally near attention layers).

    In TimeViper's Nemotron-Nano-v2 (56 layers, attention at 14, 21, 30 and 39) layer 7 is a
    Mamba-2 layer, which suits a uniform drop, and layer 39 an attention layer, whose scores the
    attention-guided drop reads (eq. 5). attention_layers: the decoder layers that keep
    attention; None means all of them (a Transformer teacher). A hybrid student's deep point
    thus moves to its nearest attention layer (28 layers with mamba2-hybrid-25's Mamba-2 layers
    3, 7, ..., 27: uniform at 3, attention-guided at 20 rather than the Mamba-2 layer 19).
    Raises ValueError for fewer than 3 layers or when no attention layer lies after the
    uniform point."""
    if num_layers < 3:
        raise ValueError(f"the paper schedule needs at least 3 decoder layers, got {num_layers}")
    shallow = max(1, num_layers * 7 // 56)
    if attention_layers is None:
        attention_layers = tuple(range(num_layers))
    candidates = [index for index in attention_layers if shallow < index < num_layers]
    if not candidates:
        raise ValueError(
            f"the paper schedule's attention-guided TransV needs an attention layer after layer "
            f"{shallow}, and this model has none (attention layers: {list(attention_layers)}); "
            "give an explicit uniform-only schedule instead"
        )
    target = num_layers * 39 // 56
    deep = min(candidates, key=lambda index: (abs(index - target), -index))
    return (TransVPoint(shallow, 0.5, "uniform"), TransVPoint(deep, 0.9, "attention"))


def resolve_schedule(
    schedule, num_layers: int, attention_layers: tuple[int, ...] | None = None
) -> tuple[TransVPoint, ...]:
    """TransV points, sorted by layer, from points, dicts ({"layer", "drop", "mode"}) or "paper".

    Layers must be in 1..num_layers-1: layer 0 always sees the whole sequence, which is what
    keeps the cache's sequence length (read from layer 0) the length of the full input.
    attention_layers: the decoder layers that keep attention (None: all). An attention-guided
    point needs one: its scores are that layer's attention (paper 002 eq. 5), which a linear
    mixer does not have, so such a point at a linear-mixer layer is refused by name."""
    if isinstance(schedule, str):
        if schedule != "paper":
            raise ValueError(f"unknown TransV schedule {schedule!r}; expected 'paper' or a list")
        return paper_schedule(num_layers, attention_layers)
    points = []
    for item in schedule:
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"layer", "drop", "mode"})
            if unknown:
                raise ValueError(f"unknown TransV fields {unknown}; expected layer, drop, mode")
            item = TransVPoint(**item)
        if not isinstance(item, TransVPoint):
            raise ValueError(f"a TransV point must be a dict or TransVPoint, got {item!r}")
        if not 1 <= item.layer < num_layers:
            raise ValueError(
                f"TransV layer {item.layer} is out of range for a model with {num_layers} "
                f"decoder layers (valid: 1..{num_layers - 1})"
            )
        if (
            item.mode == "attention"
            and attention_layers is not None
            and item.layer not in attention_layers
        ):
            raise ValueError(
                f"attention-guided TransV at layer {item.layer} needs an attention layer, but "
                f"layer {item.layer} is a linear-mixer layer of this student; "
                f"{_nearest_attention(item.layer, attention_layers)}"
            )
        points.append(item)
    layers = [point.layer for point in points]
    if len(set(layers)) != len(layers):
        raise ValueError(f"TransV layers have duplicates: {layers}")
    if not points:
        raise ValueError("a TransV schedule needs at least one point")
    return tuple(sorted(points, key=lambda point: point.layer))


def saved_schedule(points: list[dict], text_model) -> list[dict]:
    """A schedule read from a saved student's config (`linvid_transv`), made loadable. Students
    saved before attention-guided points were refused at linear-mixer layers may hold such
    points, which ran as uniform drops (no attention scores there): they load as the uniform
    points they always were, with a warning, rather than being refused."""
    attention_layers = _attention_layers(text_model)
    fixed = []
    for point in points:
        point = dict(point)
        if point.get("mode") == "attention" and point.get("layer") not in attention_layers:
            warnings.warn(
                f"this student was saved with an attention-guided TransV at linear-mixer layer "
                f"{point['layer']}, which always ran as a uniform drop; it loads as uniform "
                f"({_nearest_attention(point['layer'], attention_layers)})",
                stacklevel=3,
            )
            point["mode"] = "uniform"
        fixed.append(point)
    return fixed


def _nearest_attention(layer: int, attention_layers) -> str:
    """The hint of a refused attention-guided point: the attention layers nearest `layer`."""
    if not attention_layers:
        return "it has no attention layer at all: use mode 'uniform'"
    distance = min(abs(index - layer) for index in attention_layers)
    nearest = [index for index in attention_layers if abs(index - layer) == distance]
    return f"nearest attention layers: {nearest} (or use mode 'uniform' there)"


def _attention_layers(text_model) -> tuple[int, ...]:
    """The decoder layers of a (student's) language model that still run attention."""
    return tuple(
        index
        for index, layer in enumerate(text_model.layers)
        if not isinstance(layer.self_attn, MixerAttention)
    )


def _transfer_source(layer: int, attention_layers: tuple[int, ...]) -> int | None:
    """The attention layer whose q/k/v/o a TransV before `layer` starts from: the layer itself
    when it has attention, else the nearest attention layer (the shallower on a tie); None
    when the model has no attention layer."""
    if not attention_layers:
        return None
    return min(attention_layers, key=lambda index: (abs(index - layer), index))


def apply_transv(model, schedule, *, init: str = "transfer"):
    """Add TransV (paper 002 eq. 5-6) to a Qwen2.5-VL teacher or linvid student, in place.

    schedule: "paper", or a list of TransVPoint / {"layer", "drop", "mode"} dicts.
    init: "transfer" copies q/k/v/o of the cross-attention from the attention of the layer it
    sits before, or, before a linear-mixer layer (which has none), from the nearest attention
    layer (the shallower on a tie; random only in a model without attention); "random" uses
    nn.Linear's default. alpha starts at 0 either way, so the output is the same at init.
    An attention-guided point must sit at an attention layer (refused by name otherwise; the
    "paper" schedule picks one). Returns the model.
    """
    if not isinstance(model, Qwen2_5_VLForConditionalGeneration):
        raise ValueError(f"TransV needs a Qwen2.5-VL model, got {type(model).__name__}")
    if init not in INITS:
        raise ValueError(f"unknown TransV init {init!r}; expected one of {INITS}")
    text_model = model.model.language_model
    if isinstance(text_model, TransVTextModel):
        raise ValueError("this model already has TransV")
    text_config = model.config.text_config
    attention_layers = _attention_layers(text_model)
    points = resolve_schedule(schedule, text_config.num_hidden_layers, attention_layers)
    if text_model.has_sliding_layers:
        raise ValueError("TransV does not support sliding-window attention layers")
    plan = getattr(model, "plan", None)
    if plan is not None and plan.mixer == "mmate":
        late = [i for i in model.linear_layers if i >= points[0].layer]
        if late:
            raise ValueError(
                f"M-MATE layers {late} come at or after TransV layer {points[0].layer}: M-MATE "
                "needs each video's full (T, H, W) grid, which TransV breaks; put TransV after "
                "the last M-MATE layer"
            )
    # The cache reports the sequence length (decoding positions) from its first attention layer
    # (layer 0 without any): that layer must still see every token.
    length_layer = attention_layers[0] if attention_layers else 0
    if length_layer >= points[0].layer:
        raise ValueError(
            f"the first TransV layer ({points[0].layer}) must come after decoder layer "
            f"{length_layer}, the first attention layer, from whose cache the sequence length "
            "is read"
        )
    modules = nn.ModuleDict()
    for point in points:
        layer = text_model.layers[point.layer]
        source = _transfer_source(point.layer, attention_layers)
        if init == "transfer" and source is not None:
            module = TransV.from_attention(
                text_model.layers[source].self_attn,
                text_config,
                layer.input_layernorm,
                drop=point.drop,
                mode=point.mode,
            )
        else:
            heads = text_config.num_attention_heads
            module = TransV(
                text_config.hidden_size,
                heads,
                text_config.num_key_value_heads,
                text_config.hidden_size // heads,
                layer.input_layernorm,
                drop=point.drop,
                mode=point.mode,
                projection_bias=True,
            )
            weight = text_model.embed_tokens.weight
            module.to(device=weight.device, dtype=weight.dtype)
        modules[str(point.layer)] = module
    text_model.transv = modules
    text_model.transv_schedule = points
    text_model.transv_vision_mask = None
    text_model.transv_prompt_length = None
    text_model.transv_context_holder = getattr(model, "context_holder", None)
    text_model.transv_enabled = True
    text_model.__class__ = TransVTextModel
    model.register_forward_pre_hook(_find_vision_tokens, with_kwargs=True)
    model.register_forward_hook(_forget_vision_tokens, always_call=True)
    if hasattr(model.config, "linvid_plan"):
        model.config.linvid_transv = [asdict(point) for point in points]
    return model


def has_transv(model) -> bool:
    """Whether `model` (or a module inside it, e.g. a PEFT or DDP wrapper's) has TransV."""
    return any(isinstance(module, TransVTextModel) for module in model.modules())


def set_transv_enabled(model, enabled: bool) -> None:
    """Switch every TransV inside `model` on or off. Off, no TransV point drops anything: the
    forward is transformers' own (as with p = 0) and the TransV parameters get no gradient.
    Raises ValueError when `model` has no TransV."""
    found = False
    for module in model.modules():
        if isinstance(module, TransVTextModel):
            module.transv_enabled = bool(enabled)
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no TransV to switch")


def _find_vision_tokens(model, args, kwargs):
    """Forward pre-hook: store this call's (B, L) vision mask and `transv_prompt_length` (a
    keyword of the model's forward, removed here) on the language model."""
    # Imported here: qwen2_5_vl imports this module to rebuild saved TransV models.
    from linvid.models.qwen2_5_vl import _token_types

    input_ids = kwargs.get("input_ids", args[0] if args else None)
    reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    vision_mask = None
    if reference is not None:
        types = _token_types(
            model.config,
            input_ids,
            kwargs.get("mm_token_type_ids"),
            reference.shape[1],
            kwargs.get("image_grid_thw"),
            kwargs.get("video_grid_thw"),
        )
        vision_mask = None if types is None else types > 0
    text_model = model.model.language_model
    text_model.transv_vision_mask = vision_mask
    text_model.transv_prompt_length = kwargs.pop("transv_prompt_length", None)
    return args, kwargs


def _forget_vision_tokens(model, args, output):
    model.model.language_model.transv_vision_mask = None
    model.model.language_model.transv_prompt_length = None


class TransVTextModel(Qwen2_5_VLTextModel):
    """Qwen2.5-VL's language model with TransV points (built by `apply_transv`, not directly).

    Extra attributes: transv (ModuleDict, layer index -> TransV), transv_schedule,
    transv_vision_mask (set per call by the model's hook), transv_context_holder (a student's
    ContextHolder, whose MixerContext is shortened with the sequence, or None), transv_enabled
    (`set_transv_enabled`: False makes every point drop nothing).
    The cache remembers what was dropped: `cache.transv_kept` {layer: (B, L') positions of the
    prefill tokens kept from that layer on, -1 for new left padding} and `cache.transv_masks`
    {layer: (B, cached) 2D padding mask of that segment's cached tokens}; decoded tokens are
    always kept.
    """

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ):
        past_key_values = given_cache(cache, past_key_values)
        vision_mask = self.transv_vision_mask
        dropped_before = bool(getattr(past_key_values, "transv_kept", None))
        enabled = getattr(self, "transv_enabled", True)
        drops_now = (
            enabled
            and vision_mask is not None
            and any(
                dropped_count(int(vision_mask.sum(dim=1).max()), point.drop) > 0
                for point in self.transv_schedule
            )
        )
        if not drops_now and not dropped_before:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **cache_keyword(past_key_values),
                **kwargs,
            )
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if drops_now and past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError(
                "TransV needs the vision tokens and their instruction in one prefill call; this "
                "call has vision tokens but continues a filled cache"
            )
        if attention_mask is not None and not (
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        ):
            raise ValueError(
                "TransV needs a 2D attention mask (B, past + L) or None, got a prepared mask "
                f"({type(attention_mask).__name__})"
            )

        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(length, device=inputs_embeds.device) + past
            position_ids = position_ids.view(1, 1, -1).expand(3, batch, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None, ...].expand(3, position_ids.shape[0], -1)
        if position_ids.shape[0] == 4:  # text positions first, for packed sequences: unused
            position_ids = position_ids[1:]

        # Teacher forcing: tokens from prompt_length on are the response (no transfer, and the
        # last instruction token is the last prompt token), as they are when decoded. Padding
        # is on the left, so the response is the last `response` tokens of every segment.
        prompt_length = self.transv_prompt_length
        response = 0 if prompt_length is None else length - prompt_length
        hidden_states = inputs_embeds
        device = hidden_states.device
        cos, sin = self.rotary_emb(hidden_states, position_ids)
        kept_positions = torch.arange(length, device=device).expand(batch, -1)
        padding = torch.ones(batch, length, dtype=torch.bool, device=device)
        if attention_mask is not None:
            padding = attention_mask[:, -length:].bool()
        kept_record = dict(getattr(past_key_values, "transv_kept", None) or {})
        mask_record = dict(getattr(past_key_values, "transv_masks", None) or {})
        mask = self._segment_mask(0, hidden_states, past_key_values, attention_mask)
        for index, decoder_layer in enumerate(self.layers):
            if drops_now and str(index) in self.transv:
                module = self.transv[str(index)]
                current_prompt = hidden_states.shape[1] - response
                scores = None
                if module.mode == "attention":
                    scores = self._vision_scores(
                        decoder_layer, hidden_states, vision_mask, padding, cos, sin, current_prompt
                    )
                before = hidden_states.shape[1]
                hidden_states, kept = module(hidden_states, vision_mask, scores, current_prompt)
                if hidden_states.shape[1] < before:
                    slots = kept >= 0
                    kept = kept.clamp(min=0)
                    kept_positions = torch.where(slots, kept_positions.gather(1, kept), -1)
                    cos = cos.gather(1, kept[..., None].expand(-1, -1, cos.shape[-1]))
                    sin = sin.gather(1, kept[..., None].expand(-1, -1, sin.shape[-1]))
                    vision_mask = vision_mask.gather(1, kept) & slots
                    padding = padding.gather(1, kept) & slots
                    kept_record[index] = kept_positions
                    mask_record[index] = padding.new_zeros(batch, 0)
                    self._shorten_context(vision_mask, padding)
            if index in kept_record:  # a segment starts: this layer's cache is shorter
                mask_record[index] = torch.cat([mask_record[index], padding], dim=1)
                mask = self._segment_mask(index, hidden_states, past_key_values, mask_record[index])
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=(cos, sin),
                position_ids=None,
                use_cache=use_cache,
                **cache_keyword(past_key_values),
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if past_key_values is not None:
            past_key_values.transv_kept = kept_record
            past_key_values.transv_masks = mask_record
        # Dropped tokens have no last hidden state: zeros there keep the (B, L, D) output that
        # logits, losses and generate() index by input position. New padding slots (-1) write
        # to an extra column that is cut off.
        full = hidden_states.new_zeros(batch, length + 1, hidden_states.shape[-1])
        target = torch.where(kept_positions >= 0, kept_positions, length)
        full = full.scatter(1, target[..., None].expand(-1, -1, full.shape[-1]), hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=full[:, :length], **cache_keyword(past_key_values)
        )

    def _segment_mask(self, start: int, hidden_states, past_key_values, attention_mask):
        """The causal mask of the layers from `start` to the next TransV point, sized by the
        cache of the first attention layer among them (None when they are all linear).
        attention_mask: None or (B, cached + L) 2D mask of this segment's tokens."""
        end = min([p.layer for p in self.transv_schedule if p.layer > start] + [len(self.layers)])
        attention = [
            index
            for index in range(start, end)
            if not isinstance(self.layers[index].self_attn, MixerAttention)
        ]
        if not attention:
            return None
        return create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            position_ids=None,
            layer_idx=attention[0],
            **cache_keyword(past_key_values),
        )

    @torch.no_grad()
    def _vision_scores(
        self, decoder_layer, hidden_states, vision_mask, padding, cos, sin, prompt_length
    ):
        """(B, N_max) attention of the last prompt token to each sample's vision tokens, in
        order (paper 002 eq. 5, Attn(X_T1, X)): the layer's own q/k projections and rotary
        embeddings, softmax over all the real tokens that token attends to (as the layer
        computes it), mean over heads. Only attention layers have these scores:
        `resolve_schedule` refuses an attention-guided point anywhere else."""
        attention = decoder_layer.self_attn
        if isinstance(attention, MixerAttention):
            raise RuntimeError("attention-guided TransV reached a linear-mixer layer")
        batch = hidden_states.shape[0]
        head_dim = attention.head_dim
        end = prompt_length  # the query is token end - 1
        normed = decoder_layer.input_layernorm(hidden_states[:, :end])
        query = attention.q_proj(normed[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
        keys = attention.k_proj(normed).view(batch, end, -1, head_dim).transpose(1, 2)
        query, _ = apply_rotary_pos_emb(query, query, cos[:, end - 1 : end], sin[:, end - 1 : end])
        _, keys = apply_rotary_pos_emb(keys, keys, cos[:, :end], sin[:, :end])
        keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
        logits = (query.float() @ keys.float().transpose(-1, -2)) * attention.scaling
        logits = logits.masked_fill(~padding[:, None, None, :end], float("-inf"))
        weights = logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, end)
        count = int(vision_mask.sum(dim=1).max())
        positions = torch.argsort((~vision_mask).to(torch.int8), dim=1, stable=True)[:, :count]
        return weights.gather(1, positions.clamp(max=end - 1))

    def _shorten_context(self, vision_mask, padding):
        """A student's mixers read the shortened sequence: its vision and padding masks, and no
        video layouts (a video with dropped tokens is no longer a grid)."""
        holder = self.transv_context_holder
        if holder is None or holder.context is None:
            return
        context = holder.context
        holder.context = MixerContext(
            padding_mask=None if bool(padding.all()) else padding,
            vision_mask=vision_mask,
            videos=[[] for _ in range(vision_mask.shape[0])],
            scene_tokens=context.scene_tokens,
            scene_mask=context.scene_mask,
        )
