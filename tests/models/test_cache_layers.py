"""linvid/models/cache.py through transformers' Cache interface, without a model: the parts the
mutation run (docs/mutation.md) found unexercised. Beam search and contrastive search reorder,
repeat and select the batch; offloading moves states; a reset cache starts afresh; the
index-based and rollback entry points refuse with a message; state_bytes counts every byte of
the linear states and of the attention keys/values; mask sizes follow the tokens seen."""

import inspect

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import DynamicLayer
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

from linvid.models.cache import (
    CACHE_ARGUMENT,
    HybridCache,
    MixerStateLayer,
    _cache_argument,
    given_cache,
    output_cache,
)


def mixer_state(batch: int) -> dict[str, torch.Tensor]:
    """A state with two differently shaped and typed tensors, row b filled with b."""
    rows = torch.arange(batch, dtype=torch.float64)
    return {
        "recurrent": rows[:, None, None].expand(batch, 2, 3).clone().float(),
        "shift": rows[:, None].expand(batch, 5).clone(),
    }


def test_the_cache_argument_follows_the_installed_transformers():
    """transformers 5.24 renamed `past_key_values` to `cache` (README, "Tested versions")."""
    renamed = Version(transformers.__version__).release >= (5, 24)
    parameters = inspect.signature(Qwen2_5_VLDecoderLayer.forward).parameters
    assert ("cache" in parameters) == renamed
    assert _cache_argument() == CACHE_ARGUMENT == ("cache" if renamed else "past_key_values")


def test_a_cache_is_taken_under_either_name_but_only_once():
    """linvid's forwards accept `cache=` (transformers >= 5.24) and `past_key_values=` (before)."""
    one, other = HybridCache(num_layers=1, linear_layers=[0]), HybridCache(1, [0])
    assert given_cache() is None
    assert given_cache(cache=one) is one
    assert given_cache(past_key_values=one) is one
    assert given_cache(cache=one, past_key_values=one) is one
    message = r"^pass the cache once: got both cache= and past_key_values=$"
    with pytest.raises(ValueError, match=message):
        given_cache(cache=one, past_key_values=other)


def test_output_cache_of_an_output_without_one_is_none():
    assert output_cache(object()) is None


def test_beam_reordering_repeating_and_selecting_act_on_every_state_tensor():
    cache = HybridCache(num_layers=3, linear_layers=[0, 2])
    for index in (0, 2):
        cache.layers[index].store(mixer_state(3), new_tokens=4)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    expected_rows = [2.0, 0.0, 0.0]
    cache.batch_repeat_interleave(2)
    expected_rows = [row for row in expected_rows for _ in range(2)]
    cache.batch_select_indices(torch.tensor([5, 0, 2]))
    expected_rows = [expected_rows[5], expected_rows[0], expected_rows[2]]
    for index in (0, 2):
        state = cache.layers[index].state
        assert state["recurrent"].shape == (3, 2, 3) and state["shift"].shape == (3, 5)
        assert state["recurrent"].dtype == torch.float32 and state["shift"].dtype == torch.float64
        for name in ("recurrent", "shift"):
            rows = state[name].flatten(1)
            assert torch.equal(rows, torch.tensor(expected_rows)[:, None].expand_as(rows).to(rows))
        assert cache.layers[index].seen_tokens == 4


def test_offload_and_prefetch_keep_the_state_on_its_device():
    layer = MixerStateLayer()
    layer.offload()  # nothing stored yet: nothing to move
    layer.prefetch()
    assert layer.state is None
    layer.store({}, new_tokens=1)  # a mixer may keep no tensor
    assert layer.device is None and layer.seen_tokens == 1
    state = mixer_state(2)
    layer.store(state, new_tokens=3)
    assert (layer.device, layer.dtype) == (torch.device("cpu"), torch.float32)
    layer.offload()
    layer.prefetch()
    assert layer.state.keys() == state.keys()
    for name, tensor in layer.state.items():
        assert tensor.device == torch.device("cpu")
        assert torch.equal(tensor, state[name]) and tensor.dtype == state[name].dtype


def test_a_reset_cache_has_no_state_and_no_tokens():
    cache = HybridCache(num_layers=2, linear_layers=[0, 1])
    assert not cache.has_previous_state(0)
    for index in (0, 1):
        cache.layers[index].store(mixer_state(1), new_tokens=7)
    assert cache.has_previous_state(0) and cache.has_previous_state()
    for index in (0, 1):  # a decoding step: the tokens add up
        cache.layers[index].store(mixer_state(1), new_tokens=1)
    assert cache.get_seq_length() == 8
    cache.reset()
    assert not cache.has_previous_state(0) and not cache.has_previous_state()
    assert cache.get_seq_length() == 0
    assert all(cache.layers[index].state is None for index in (0, 1))
    assert cache.state_bytes() == {"linear_states": 0, "attention_kv": 0}
    for index in (0, 1):  # and it is used again from scratch
        cache.layers[index].store(mixer_state(1), new_tokens=2)
    assert cache.has_previous_state(0) and cache.get_seq_length() == 2
    one_layer = HybridCache(num_layers=1, linear_layers=[0])
    one_layer.layers[0].store(mixer_state(1), new_tokens=3)
    assert one_layer.get_seq_length() == 3 and one_layer.get_mask_sizes(2) == (5, 0)


def test_index_based_and_rollback_entry_points_refuse_with_a_message():
    layer = MixerStateLayer()
    message = r"^linvid mixers store their state with MixerStateLayer\.store$"
    with pytest.raises(NotImplementedError, match=message):
        layer.lazy_initialization(recurrent_states=torch.zeros(1))
    with pytest.raises(NotImplementedError, match=message):
        layer.update_conv_state(torch.zeros(1))
    with pytest.raises(NotImplementedError, match=message):
        layer.update_recurrent_state(torch.zeros(1))
    assert not layer.is_croppable
    cache = HybridCache(num_layers=2, linear_layers=[0])
    cropped = (
        r"^a linear \(recurrent\) layer's state cannot be cropped; assisted decoding and other "
        r"rollbacks need attention-only models$"
    )
    with pytest.raises(RuntimeError, match=cropped):
        cache.crop(-1)  # transformers' way of removing the last token


def test_state_bytes_count_linear_states_and_attention_keys_and_values():
    cache = HybridCache(num_layers=4, linear_layers=[1, 3])
    assert cache.state_bytes() == {"linear_states": 0, "attention_kv": 0}
    cache.layers[1].store(mixer_state(2), new_tokens=6)  # 2*2*3 float32 + 2*5 float64
    cache.layers[3].store({"recurrent": torch.zeros(4, dtype=torch.bfloat16)}, new_tokens=6)
    keys = torch.zeros(1, 2, 6, 8, dtype=torch.float16)
    cache.update(keys, torch.zeros_like(keys), layer_idx=0)  # layer 2 is never filled
    assert isinstance(cache.layers[2], DynamicLayer)
    assert cache.state_bytes() == {
        "linear_states": (12 * 4 + 10 * 8) + 4 * 2,
        "attention_kv": 2 * (2 * 6 * 8) * 2,
    }


def test_mask_sizes_follow_the_tokens_seen():
    linear_only = HybridCache(num_layers=2, linear_layers=[0, 1])
    for index in (0, 1):
        linear_only.layers[index].store(mixer_state(1), new_tokens=5)
    assert linear_only.get_mask_sizes(3) == (8, 0)
    # With an attention layer, transformers' rule (its keys' length) holds, asked by default of
    # layer 0 (here the attention layer; layer 1 is linear and has no mask of its own).
    mixed = HybridCache(num_layers=2, linear_layers=[1])
    keys = torch.zeros(1, 2, 4, 8)
    mixed.update(keys, keys, layer_idx=0)
    mixed.layers[1].store(mixer_state(1), new_tokens=4)
    assert mixed.get_mask_sizes(3) == (7, 0)
    assert mixed.get_seq_length() == 4
