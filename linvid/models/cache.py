"""The hybrid cache: transformers' DynamicCache with a fixed-size state layer for every
converted (linear) decoder layer and ordinary KV layers for the attention layers left.

A linear layer's state is a flat dict of tensors chosen by its mixer (recurrent state,
token-shift or conv inputs, cached scene keys/values); none of them grows with the sequence.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionCacheLayerMixin
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

from linvid.layers.base import MixerState


def _cache_argument() -> str:
    """The name transformers passes the cache under: "cache" from 5.24 on (its decoder layers,
    attention, masks, generate() and model outputs), "past_key_values" before (5.24 to 5.39
    still accept it as a deprecated alias on the way in, but pass and return "cache")."""
    parameters = inspect.signature(Qwen2_5_VLDecoderLayer.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


CACHE_ARGUMENT = _cache_argument()


def cache_keyword(cache) -> dict:
    """`{name: cache}` under the installed transformers' name for it, to splat into a call."""
    return {CACHE_ARGUMENT: cache}


def given_cache(cache=None, past_key_values=None):
    """The cache a caller passed under either name (linvid's own forwards accept both); both
    given and different is an error."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once: got both cache= and past_key_values=")
    return cache if cache is not None else past_key_values


def output_cache(output):
    """The cache a transformers model output carries (`output.cache` from 5.24 on,
    `output.past_key_values` before), or None."""
    return getattr(output, CACHE_ARGUMENT, None)


class MixerStateLayer(LinearAttentionCacheLayerMixin):
    """Cache entry of one converted decoder layer: the mixer's state and how many tokens it
    has consumed (so a model with no attention layer left still knows its position)."""

    # States are replaced, not updated at static addresses: no CUDA graphs / torch.compile
    # cache path (this also keeps generate() passing the 2D padding mask the mixers read).
    is_compileable = False

    def __init__(self, **kwargs):
        super().__init__(number_of_states=1)
        self.state: MixerState | None = None
        self.seen_tokens = 0

    # transformers' linear-attention layers keep conv/recurrent tensors by index; linvid mixers
    # keep named states instead, so the index-based entry points are not used.
    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx=0) -> None:
        raise NotImplementedError("linvid mixers store their state with MixerStateLayer.store")

    def update_conv_state(self, conv_states, state_idx=0):
        raise NotImplementedError("linvid mixers store their state with MixerStateLayer.store")

    def update_recurrent_state(self, recurrent_states, state_idx=0):
        raise NotImplementedError("linvid mixers store their state with MixerStateLayer.store")

    def store(self, state: MixerState, new_tokens: int) -> None:
        """Keep the mixer's state after it consumed `new_tokens` more tokens."""
        self.state = state
        self.seen_tokens += new_tokens
        first = next(iter(state.values()), None)
        if first is not None:
            self.device, self.dtype = first.device, first.dtype
        self.has_previous_state[0] = True

    def _map(self, function) -> None:
        if self.state is not None:
            self.state = {name: function(tensor) for name, tensor in self.state.items()}

    def reset(self) -> None:
        self.state, self.seen_tokens = None, 0
        self.has_previous_state[0] = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda tensor: tensor[indices])

    def offload(self) -> None:
        self._map(lambda tensor: tensor.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.device is not None:
            self._map(lambda tensor: tensor.to(self.device, non_blocking=True))

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot be rolled back

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(
            "a linear (recurrent) layer's state cannot be cropped; assisted decoding and other "
            "rollbacks need attention-only models"
        )

    def state_bytes(self) -> int:
        """Bytes held by this layer's state."""
        if self.state is None:
            return 0
        return sum(tensor.numel() * tensor.element_size() for tensor in self.state.values())


class HybridCache(DynamicCache):
    """DynamicCache whose converted layers hold MixerStateLayer entries.

    linear_layers: indices of the decoder layers that are linear mixers; num_layers: all.
    """

    def __init__(self, num_layers: int, linear_layers):
        linear_layers = set(linear_layers)
        layers = [
            MixerStateLayer() if index in linear_layers else DynamicLayer()
            for index in range(num_layers)
        ]
        super().__init__()
        self.layers = layers
        self.linear_layers = tuple(sorted(linear_layers))

    def _has_attention(self) -> bool:
        return len(self.linear_layers) < len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._has_attention():
            return super().get_seq_length(layer_idx)
        return self.layers[self.linear_layers[0]].seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self._has_attention():
            return super().get_mask_sizes(query_length, layer_idx)
        return self.get_seq_length() + query_length, 0

    def state_bytes(self) -> dict[str, int]:
        """Bytes held by the linear layers' states and by the attention layers' keys/values."""
        linear = sum(self.layers[index].state_bytes() for index in self.linear_layers)
        attention = 0
        for layer in self.layers:
            if isinstance(layer, DynamicLayer) and getattr(layer, "is_initialized", False):
                for tensor in (layer.keys, layer.values):
                    attention += tensor.numel() * tensor.element_size()
        return {"linear_states": linear, "attention_kv": attention}
