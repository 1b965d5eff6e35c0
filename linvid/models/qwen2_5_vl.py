"""Qwen2.5-VL students: the config and model classes a converted Qwen2.5-VL becomes, the
per-call MixerContext built from Qwen2.5-VL's inputs, and Auto-class registration.

A student is still a `Qwen2_5_VLForConditionalGeneration` (same vision tower, embeddings,
MLPs, norms, LM head, generate()); its config has model_type "linvid_qwen2_5_vl" and records
the conversion plan, so `AutoModelForImageTextToText.from_pretrained(dir)` rebuilds it after
`import linvid`, with no remote code.

Its weights are saved as the "linvid" variant of transformers' checkpoint layout
(model.linvid.safetensors, or model.linvid-0000N-of-0000M.safetensors with
model.safetensors.index.linvid.json): a loader that does not know the plan (plain
`Qwen2_5_VLForConditionalGeneration.from_pretrained`, lmms-eval's built-in qwen2_5_vl) finds
no model.safetensors and stops with an error, instead of loading the converted layers'
attention weights as MISSING (freshly initialised) and scoring the wrong model. The student
class picks the variant itself; directories saved before this layout still load.
"""

from __future__ import annotations

import contextvars
import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.cache_utils import DynamicCache
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

from linvid.layers.base import MixerContext, VideoLayout
from linvid.models.cache import HybridCache, cache_keyword, given_cache
from linvid.models.mixer_attention import ContextHolder, MixerAttention
from linvid.models.mixers import build_mixer, mixer_needs_scenes
from linvid.models.plan import ConversionPlan, resolve_plan
from linvid.models.transv import apply_transv, saved_schedule
from linvid.video.scenes import scene_boundaries, scene_tokens

IMAGE_TYPE, VIDEO_TYPE = 1, 2  # Qwen2.5-VL's mm_token_type_ids: 0 text, 1 image, 2 video
STUDENT_VARIANT = "linvid"  # checkpoint files model.linvid*.safetensors (see the module doc)
NAMED_WEIGHTS = 3  # weight names quoted per kind in a StudentWeightsError
# (source, ignore_mismatched_sizes) while a strict `from_pretrained` of a student runs, else
# None; read by the loading hook.
_STRICT_LOADING: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar(
    "linvid_strict_student_loading", default=None
)


class StudentWeightsError(ValueError):
    """A saved student whose checkpoint does not fit the structure its config.json plan
    builds: weights missing, unused or of another shape. The message names a few of them,
    their counts and the directory."""


def check_student_weights(source: str, *, missing=(), unexpected=(), mismatched=()) -> None:
    """Raise StudentWeightsError when a student's load left weights `missing` (in the model,
    not in the checkpoint: they would be freshly initialised), `unexpected` (in the checkpoint,
    unused) or `mismatched` ((name, checkpoint shape, model shape) tuples, or names)."""
    problems = []
    for kind, keys in (
        ("missing from the checkpoint", missing),
        ("in the checkpoint but not in the model", unexpected),
        ("of another shape", mismatched),
    ):
        names = sorted(key[0] if isinstance(key, tuple | list) else str(key) for key in keys)
        if names:
            shown = ", ".join(names[:NAMED_WEIGHTS])
            more = (
                f", ... ({len(names) - NAMED_WEIGHTS} more)" if len(names) > NAMED_WEIGHTS else ""
            )
            problems.append(f"{len(names)} weights {kind} ({shown}{more})")
    if problems:
        raise StudentWeightsError(
            f"the linvid student in {source} does not match its weights: {'; '.join(problems)}. "
            "Its config.json plan (linvid_plan) must be the one it was saved with; a changed "
            "plan needs a new student (linvid convert from the teacher)"
        )


def student_variant(source) -> str | None:
    """The checkpoint variant to load a student from: "linvid", except for a local directory
    saved before the variant layout (plain model*.safetensors files), which loads as saved."""
    if not os.path.isdir(source):
        return STUDENT_VARIANT
    names = os.listdir(source)
    if any(name.startswith(f"model.{STUDENT_VARIANT}") for name in names):
        return STUDENT_VARIANT
    if any(name.startswith("model") and name.endswith(".safetensors") for name in names):
        return None
    return STUDENT_VARIANT


class LinvidQwen2_5_VLConfig(Qwen2_5_VLConfig):
    """Qwen2_5_VLConfig plus `linvid_plan` (a ConversionPlan as a dict) and `linvid_transv`
    (the TransV schedule, a list of {"layer", "drop", "mode"} dicts, or None)."""

    model_type = "linvid_qwen2_5_vl"
    linvid_plan: dict | None = None
    linvid_transv: list | None = None


class LinvidQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """A Qwen2.5-VL whose planned decoder layers run linvid mixers (see ConversionPlan)."""

    config_class = LinvidQwen2_5_VLConfig

    def __init__(self, config: LinvidQwen2_5_VLConfig):
        super().__init__(config)
        if config.linvid_plan is None:
            raise ValueError("a LinvidQwen2_5_VLConfig needs linvid_plan (a ConversionPlan dict)")
        self.context_holder = ContextHolder()
        # Structure only: the weights come from the checkpoint (from_pretrained) or from the
        # teacher (linvid.convert).
        replace_layers(self, resolve_plan(config.linvid_plan), init="random")
        if config.linvid_transv:
            schedule = saved_schedule(config.linvid_transv, self.model.language_model)
            apply_transv(self, schedule, init="random")

    @property
    def plan(self) -> ConversionPlan:
        return resolve_plan(self.config.linvid_plan)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return self.plan.layer_indices(self.config.text_config.num_hidden_layers)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved student; strict about its weights, unlike transformers' default.

        A student's structure comes from its config.json plan, its weights from the
        checkpoint: a plan edited after saving (another mixer, other layers) or weights of
        another student would leave some mixers freshly initialised and some weights unused.
        Any weight missing from the checkpoint, left unused by the model, or of another shape
        (unless ignore_mismatched_sizes) raises `StudentWeightsError` naming a few of them
        and their count. A caller passing output_loading_info=True gets transformers'
        (model, loading_info) and judges the loading info itself, without this check."""
        if kwargs.get("variant") is None:
            kwargs["variant"] = student_variant(pretrained_model_name_or_path)
        wants_info = bool(kwargs.pop("output_loading_info", False))
        strict = not wants_info
        allow_mismatched = bool(kwargs.get("ignore_mismatched_sizes", False))
        token = _STRICT_LOADING.set(
            (str(pretrained_model_name_or_path), allow_mismatched) if strict else None
        )
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        finally:
            _STRICT_LOADING.reset(token)
        if wants_info:
            return model, info
        # The same check on the report from_pretrained returns, in case a transformers
        # version does not call the hook below.
        check_student_weights(
            str(pretrained_model_name_or_path),
            missing=info.get("missing_keys", ()),
            unexpected=info.get("unexpected_keys", ()),
            mismatched=() if allow_mismatched else info.get("mismatched_keys", ()),
        )
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, in the "linvid" variant of the checkpoint layout
        (see the module doc) unless a variant is given."""
        if kwargs.get("variant") is None:
            kwargs["variant"] = STUDENT_VARIANT
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # transformers' hook (5.x) that settles the missing and unexpected keys just before
        # it logs its load report: the strict check of `from_pretrained` raises here, with
        # the report's keys cleared, so that one clear error replaces the MISSING /
        # UNEXPECTED table and the freshly initialised model.
        super()._adjust_missing_and_unexpected_keys(loading_info)
        settings = _STRICT_LOADING.get()
        if settings is None:
            return
        source, allow_mismatched = settings
        missing = set(loading_info.missing_keys)
        unexpected = set(loading_info.unexpected_keys)
        mismatched = set() if allow_mismatched else set(loading_info.mismatched_keys)
        if missing or unexpected or mismatched:
            loading_info.missing_keys, loading_info.unexpected_keys = set(), set()
            if mismatched:
                loading_info.mismatched_keys = set()
            check_student_weights(
                source, missing=missing, unexpected=unexpected, mismatched=mismatched
            )

    def make_cache(self) -> HybridCache:
        """An empty cache for this model: KV for attention layers, states for linear ones."""
        return HybridCache(self.config.text_config.num_hidden_layers, self.linear_layers)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        second_per_grid_ts=None,
        mm_encoder_outputs=None,
        cache=None,
        **kwargs,
    ):
        """Qwen2.5-VL's forward with the hybrid cache. The cache comes as `cache` or
        `past_key_values` (transformers >= 5.24 / older name); second_per_grid_ts (num_videos,)
        seconds per temporal patch, as Qwen's processor returns it, sets the video tokens'
        temporal M-RoPE positions exactly as in the teacher."""
        past_key_values = given_cache(cache, past_key_values)
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if use_cache and not isinstance(past_key_values, HybridCache):
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise ValueError(
                    "a converted model cannot continue from a filled "
                    f"{type(past_key_values).__name__}; use the HybridCache it returned"
                )
            past_key_values = self.make_cache()  # also replaces generate()'s DynamicCache
        elif not use_cache and isinstance(past_key_values, DynamicCache):
            past_key_values = None

        video_features = None
        if mixer_needs_scenes(self.plan.mixer):
            if pixel_values_videos is not None:
                # Run the vision tower here, once, to keep its per-frame outputs for scenes.
                mm_encoder_outputs = dict(mm_encoder_outputs or {})
                mm_encoder_outputs["video"] = self.model.get_video_features(
                    pixel_values_videos, video_grid_thw, return_dict=True
                )
                pixel_values_videos = None
                if pixel_values is not None:
                    # transformers takes pixels or encoder outputs, not both: the images too.
                    mm_encoder_outputs["image"] = self.model.get_image_features(
                        pixel_values, image_grid_thw, return_dict=True
                    )
                    pixel_values = None
            if mm_encoder_outputs and mm_encoder_outputs.get("video") is not None:
                video_features = mm_encoder_outputs["video"].pooler_output

        self.context_holder.context = build_context(
            self.config,
            self.plan,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            video_features=video_features,
        )
        try:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                second_per_grid_ts=second_per_grid_ts,
                mm_encoder_outputs=mm_encoder_outputs,
                **cache_keyword(past_key_values),
                **kwargs,
            )
        finally:
            self.context_holder.context = None

    def _prepare_multimodal_encoder_kwargs_for_generation(self, model_kwargs):
        # generate() encodes images/videos up front and drops their grids; the mixers still
        # need the grids (video layouts) in the prefill call, so they are kept.
        grids = {
            key: model_kwargs[key]
            for key in ("image_grid_thw", "video_grid_thw")
            if model_kwargs.get(key) is not None
        }
        model_kwargs = super()._prepare_multimodal_encoder_kwargs_for_generation(model_kwargs)
        model_kwargs.update(grids)
        return model_kwargs


def replace_layers(model, plan: ConversionPlan, init: str, teacher_attentions=None) -> None:
    """Swap the planned decoder layers' self-attention for MixerAttention(mixer).

    teacher_attentions: {layer index: attention module} to initialise from (weight reuse);
    default: the model's own attention modules.
    """
    layers = model.model.language_model.layers
    text_config = model.config.text_config
    for index in plan.layer_indices(len(layers)):
        decoder_layer = layers[index]
        attention = decoder_layer.self_attn
        if isinstance(attention, MixerAttention):
            raise ValueError(f"decoder layer {index} is already converted")
        if teacher_attentions is not None:
            attention = teacher_attentions[index]
        mixer = build_mixer(plan, attention, text_config, index, decoder_layer, init=init)
        decoder_layer.self_attn = MixerAttention(mixer, index, model.context_holder)


def build_context(
    config,
    plan: ConversionPlan,
    *,
    input_ids=None,
    inputs_embeds=None,
    attention_mask=None,
    mm_token_type_ids=None,
    image_grid_thw=None,
    video_grid_thw=None,
    video_features=None,
) -> MixerContext:
    """The MixerContext of one forward call of a Qwen2.5-VL student.

    input_ids / inputs_embeds: this call's tokens (B, L[, D]); attention_mask: (B, past + L)
    with 0 on left padding; mm_token_type_ids: (B, L) 0 text / 1 image / 2 video (from
    input_ids' placeholder tokens when absent); *_grid_thw: (num, 3) patch grids of the images
    and videos in batch order; video_features: per video, the vision tower's merged tokens
    (t * h' * w', D), for scene tokens.
    """
    reference = input_ids if input_ids is not None else inputs_embeds
    batch, length = reference.shape[:2]
    device = reference.device

    padding_mask = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        current = attention_mask[:, -length:].bool()
        if not bool(current.all()):
            padding_mask = current

    token_types = _token_types(
        config, input_ids, mm_token_type_ids, length, image_grid_thw, video_grid_thw
    )
    if token_types is None:
        return MixerContext(padding_mask=padding_mask, videos=[[] for _ in range(batch)])
    vision_mask = token_types > 0
    merge = config.vision_config.spatial_merge_size
    grids = {
        IMAGE_TYPE: iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(()),
        VIDEO_TYPE: iter(video_grid_thw.tolist()) if video_grid_thw is not None else iter(()),
    }
    videos: list[list[VideoLayout]] = []
    owners = []  # sample index of every video, in video_grid_thw order
    for sample in range(batch):
        layouts = []
        types = token_types[sample]
        position = 0
        while position < length:
            kind = int(types[position])
            if kind == 0:
                position += 1
                continue
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(
                    f"sample {sample} has more {'image' if kind == IMAGE_TYPE else 'video'} "
                    "token runs than rows in the matching *_grid_thw"
                )
            t, h, w = grid[0], grid[1] // merge, grid[2] // merge
            count = t * h * w
            run = types[position : position + count]
            if run.numel() != count or bool((run != kind).any()):
                raise ValueError(
                    f"sample {sample}: expected {count} consecutive vision tokens for grid "
                    f"{tuple(grid)} (merged {t}x{h}x{w}) at position {position}"
                )
            layouts.append(
                VideoLayout(torch.arange(position, position + count, device=device), (t, h, w))
            )
            if kind == VIDEO_TYPE:
                owners.append((sample, (t, h, w)))
            position += count
        videos.append(layouts)

    scenes, scene_mask = None, None
    if video_features is not None:
        scenes, scene_mask = _scene_tokens_per_sample(video_features, owners, batch, plan)
    return MixerContext(
        padding_mask=padding_mask,
        vision_mask=vision_mask,
        videos=videos,
        scene_tokens=scenes,
        scene_mask=scene_mask,
    )


def _token_types(config, input_ids, mm_token_type_ids, length, image_grid_thw, video_grid_thw):
    """(B, L) 0 text / 1 image / 2 video, or None when the call has no vision tokens.

    Without mm_token_type_ids, placeholders in input_ids count only for a modality whose grid
    is given: a generated token that happens to be a placeholder id is text."""
    if mm_token_type_ids is not None:
        types = mm_token_type_ids[:, -length:]
        return types if bool(types.any()) else None
    if input_ids is None:
        return None
    types = torch.zeros_like(input_ids)
    if image_grid_thw is not None:
        types[input_ids == config.image_token_id] = IMAGE_TYPE
    if video_grid_thw is not None:
        types[input_ids == config.video_token_id] = VIDEO_TYPE
    return types if bool(types.any()) else None


def _scene_tokens_per_sample(video_features, owners, batch, plan):
    """Scene tokens (paper 000 §4.1 eq. 8-10) of each sample's videos, padded to one length.

    Returns (B, S, D) tokens and a (B, S) mask of real ones."""
    per_sample = [[] for _ in range(batch)]
    for features, (sample, (t, h, w)) in zip(video_features, owners, strict=True):
        frames = features.reshape(t, h * w, features.shape[-1])
        boundaries = scene_boundaries(
            frames.detach().float(), max_scenes=plan.max_scenes, tau=plan.scene_threshold
        )
        per_sample[sample].append(scene_tokens(frames, boundaries).reshape(-1, frames.shape[-1]))
    joined = [torch.cat(tokens) if tokens else None for tokens in per_sample]
    reference = next(tokens for tokens in joined if tokens is not None)
    longest = max(tokens.shape[0] for tokens in joined if tokens is not None)
    scenes = reference.new_zeros(batch, longest, reference.shape[-1])
    mask = torch.zeros(batch, longest, dtype=torch.bool, device=reference.device)
    for sample, tokens in enumerate(joined):
        if tokens is not None:
            scenes[sample, : tokens.shape[0]] = tokens
            mask[sample, : tokens.shape[0]] = True
    return scenes, mask


AutoConfig.register(LinvidQwen2_5_VLConfig.model_type, LinvidQwen2_5_VLConfig)
# Save and load in Qwen2.5-VL's own checkpoint layout (its key renamings), so a student
# directory reads like a Qwen2.5-VL one and a teacher loaded from the hub converts cleanly.
register_checkpoint_conversion_mapping(
    LinvidQwen2_5_VLForConditionalGeneration.__name__,
    get_checkpoint_conversion_mapping(Qwen2_5_VLForConditionalGeneration.__name__),
    overwrite=True,
)
AutoModelForImageTextToText.register(
    LinvidQwen2_5_VLConfig, LinvidQwen2_5_VLForConditionalGeneration
)
