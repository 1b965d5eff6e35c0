"""Build the mixer a plan asks for, from a decoder layer's attention module."""

from __future__ import annotations

import copy

from torch import nn

from linvid.models.plan import ConversionPlan

SCENE_MIXERS = ("rwkv6_hybrid",)


def mixer_needs_scenes(mixer: str) -> bool:
    """Whether this mixer reads scene tokens (so the model must compute them)."""
    return mixer in SCENE_MIXERS


def build_mixer(
    plan: ConversionPlan,
    attention: nn.Module,
    text_config,
    layer_idx: int,
    decoder_layer,
    *,
    init: str,
) -> nn.Module:
    """The plan's mixer for decoder layer `layer_idx`, built from `attention` (weight reuse,
    init="transfer") or from a freshly initialised copy of it (init="random": same shapes,
    the projections drawn anew instead of copied from the teacher; for "rwkv6_hybrid" the
    RWKV-6 branch only, see ConversionPlan.init)."""
    from linvid.layers.hybrid_rwkv import HybridRWKVMixer
    from linvid.layers.mamba2 import Mamba2Mixer
    from linvid.layers.mmate import MMATE
    from linvid.layers.rwkv6 import RWKV6TimeMix

    source = attention
    if init == "random":
        source = copy.deepcopy(attention)
        for module in source.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    if plan.mixer == "rwkv6":
        return RWKV6TimeMix.from_attention(source, text_config)
    if plan.mixer == "rwkv6_hybrid":
        return HybridRWKVMixer.from_attention(
            attention,
            text_config,
            decoder_layer.input_layernorm,
            time_mix_attention=source,
            gate=plan.gate,
        )
    if plan.mixer == "mamba2":
        return Mamba2Mixer.from_attention(source, text_config)
    if plan.mixer == "mmate":
        return MMATE.from_attention(
            source, text_config, layer_idx=layer_idx, window=plan.window, branches=plan.branches
        )
    raise ValueError(f"unknown mixer {plan.mixer!r}")
