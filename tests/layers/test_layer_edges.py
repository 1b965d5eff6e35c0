"""The input checks every mixer shares (linvid/layers/base.py), read through real mixers: a wrong
hidden_states or state gives the same whole message (argument, axes, expected and given shape)
from each of them. Written for the surviving mutants of issue 18's mutation run; tiny sizes
(hidden 64, 4 heads, 2 kv heads, head_dim 16)."""

import re

import pytest
import torch
from layer_teachers import HEADS, HIDDEN, teacher_attention, text_config
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from linvid.layers.base import MixerContext
from linvid.layers.cross_attention import GatedCrossAttention
from linvid.layers.rwkv6 import RWKV6TimeMix


def mixers():
    """An RWKV-6 time mix and a gated cross-attention from the same teacher."""
    attention = teacher_attention(0)
    return (
        RWKV6TimeMix.from_attention(attention, text_config()),
        GatedCrossAttention.from_attention(attention, text_config(), Qwen2_5_VLRMSNorm(HIDDEN)),
    )


def raises_exactly(message):
    """pytest.raises(ValueError) for exactly `message`, the whole of it."""
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


def test_a_hidden_states_of_the_wrong_kind_reads_the_same_from_every_mixer():
    for mixer in mixers():
        with raises_exactly("hidden_states must be a torch.Tensor (B, L, hidden), got list"):
            mixer([[0.0] * HIDDEN], MixerContext.empty(1))
        with raises_exactly(
            "hidden_states must have 3 dimensions (B, L, hidden), got shape (2, 64) dtype float32"
        ):
            mixer(torch.zeros(2, HIDDEN), MixerContext.empty(2))
        with raises_exactly(
            "hidden_states must be a floating-point tensor (B, L, hidden), "
            "got shape (2, 3, 64) dtype int64"
        ):
            mixer(torch.zeros(2, 3, HIDDEN, dtype=torch.long), MixerContext.empty(2))


def test_a_hidden_states_of_the_wrong_width_names_the_expected_shape():
    for mixer in mixers():
        with raises_exactly(
            "hidden_states must have shape (B, L, hidden) = (2, 3, 64), "
            "got shape (2, 3, 65) dtype float32"
        ):
            mixer(torch.zeros(2, 3, HIDDEN + 1), MixerContext.empty(2))


def test_a_state_that_is_not_a_dict_of_the_mixer_keys_says_what_it_got():
    time_mix, cross_attention = mixers()
    hidden = torch.randn(2, 1, HIDDEN)
    for mixer, keys in ((time_mix, "['shift', 'wkv']"), (cross_attention, None)):
        expected = keys or "['scene_keys', 'scene_mask', 'scene_values']"
        with raises_exactly(f"state must be a dict with keys {expected}, got ['shift']"):
            mixer(hidden, None, {"shift": torch.zeros(2, HIDDEN)})
        with raises_exactly(f"state must be a dict with keys {expected}, got list"):
            mixer(hidden, None, [torch.zeros(2, HIDDEN)])
        with raises_exactly(f"state must be a dict with keys {expected}, got tuple"):
            mixer(hidden, None, ())


def test_a_state_tensor_of_the_wrong_rank_or_shape_names_its_key_and_axes():
    time_mix, _ = mixers()
    hidden = torch.randn(2, 3, HIDDEN)
    with torch.no_grad():
        _, state = time_mix(hidden, MixerContext.empty(2))
    key_dim = state["wkv"].shape[-1]
    flat = state | {"wkv": state["wkv"].flatten(2)}
    with raises_exactly(
        f"state['wkv'] must have 4 dimensions (B, H, K, K), "
        f"got shape (2, {HEADS}, {key_dim * key_dim}) dtype float32"
    ):
        time_mix(hidden[:, :1], None, flat)
    narrow = state | {"wkv": state["wkv"][:, :, :, 1:]}
    with raises_exactly(
        f"state['wkv'] must have shape (B, H, K, K) = (2, {HEADS}, {key_dim}, {key_dim}), "
        f"got shape (2, {HEADS}, {key_dim}, {key_dim - 1}) dtype float32"
    ):
        time_mix(hidden[:, :1], None, narrow)
