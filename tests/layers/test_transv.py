"""TransV as a module (paper 002 eq. 5-6): which vision tokens are kept, the gated transfer
into the instruction tokens, and its init."""

import pytest
import torch
from torch import nn

from linvid.layers.transv import TransV, attention_keep, dropped_count, uniform_keep

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 16, 4, 2, 4


def make_transv(drop=0.5, mode="uniform", seed=0):
    torch.manual_seed(seed)
    return TransV(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, nn.RMSNorm(HIDDEN), drop=drop, mode=mode)


def sequence(batch=1, prefix=2, vision=8, instruction=3, seed=0):
    """(hidden (B, L, D), vision_mask (B, L)): text, then vision tokens, then instruction."""
    generator = torch.Generator().manual_seed(seed)
    length = prefix + vision + instruction
    hidden = torch.randn(batch, length, HIDDEN, generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, prefix : prefix + vision] = True
    return hidden, mask


@pytest.mark.parametrize(
    ("count", "drop", "expected"),
    [(8, 0.5, [0, 2, 4, 6]), (10, 0.9, [0]), (8, 0.0, list(range(8))), (6, 0.34, [0, 1, 3, 4])],
)
def test_uniform_keeps_evenly_spaced_tokens(count, drop, expected):
    assert uniform_keep(count, drop).tolist() == expected
    assert dropped_count(count, drop) == count - len(expected)


def test_attention_keeps_the_most_attended_tokens_in_order():
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.04], [0.6, 0.1, 0.2, 0.05, 0.05]])
    assert attention_keep(scores, 0.6).tolist() == [[1, 3], [0, 2]]


@pytest.mark.parametrize("drop", [-0.1, 1.0, 1.5, True, "half"])
def test_bad_drop_rates_are_clear_errors(drop):
    with pytest.raises(ValueError, match="drop rate"):
        make_transv(drop=drop)


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="mode"):
        make_transv(mode="random")


def test_drop_shortens_the_sequence_and_keeps_text_and_chosen_vision_tokens():
    hidden, mask = sequence()
    output, kept = make_transv(drop=0.5)(hidden, mask)
    # text 0,1 | vision 2..9, every second kept | instruction 10..12
    assert kept.tolist() == [[0, 1, 2, 4, 6, 8, 10, 11, 12]]
    assert output.shape == (1, 9, HIDDEN)
    # alpha = 0: every kept token, instruction tokens included, is exactly its input.
    assert torch.equal(output, hidden[:, kept[0]])


def test_attention_mode_follows_the_scores():
    hidden, mask = sequence()
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.0, 0.8, 0.0, 0.0, 0.7]])
    _, kept = make_transv(drop=0.5, mode="attention")(hidden, mask, scores)
    # vision tokens 1, 2, 4, 7 (positions 3, 4, 6, 9) are the most attended
    assert kept.tolist() == [[0, 1, 3, 4, 6, 9, 10, 11, 12]]


def test_zero_drop_returns_the_input():
    hidden, mask = sequence()
    output, kept = make_transv(drop=0.0)(hidden, mask)
    assert output is hidden and kept.shape == (1, hidden.shape[1])


def test_nonzero_alpha_changes_only_instruction_tokens_and_alpha_gets_gradients():
    hidden, mask = sequence(batch=2)
    module = make_transv(drop=0.5)
    output, kept = module(hidden, mask)
    output.sum().backward()
    assert module.alpha.grad is not None and module.alpha.grad.abs().item() > 0
    with torch.no_grad():
        module.alpha.fill_(0.7)
        moved, _ = module(hidden, mask)
    changed = (moved - hidden.gather(1, kept[..., None].expand(-1, -1, HIDDEN))).abs().amax(-1)
    assert bool((changed[:, -3:] > 0).all()) and bool((changed[:, :-3] == 0).all())


def test_prompt_length_leaves_response_tokens_unchanged():
    hidden, mask = sequence(instruction=5)
    module = make_transv(drop=0.5)
    with torch.no_grad():
        module.alpha.fill_(0.7)
        output, kept = module(hidden, mask, prompt_length=hidden.shape[1] - 2)
    assert torch.equal(output[:, -2:], hidden[:, -2:])
    assert not torch.equal(output[:, -3], hidden[:, -3])


def test_from_attention_copies_the_projections():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=True)
            self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=True)
            self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=True)
            self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    class Config:
        hidden_size, num_attention_heads, num_key_value_heads = HIDDEN, HEADS, KV_HEADS

    attention = Attention()
    module = TransV.from_attention(attention, Config(), nn.RMSNorm(HIDDEN), drop=0.9)
    assert torch.equal(module.query.weight, attention.q_proj.weight)
    assert torch.equal(module.value.bias, attention.v_proj.bias)
    assert torch.equal(module.output.weight, attention.o_proj.weight)
    assert module.alpha.item() == 0.0 and module.drop == 0.9
    assert "norm.weight" not in module.state_dict()


def test_samples_with_fewer_drops_get_new_left_padding():
    hidden, mask = sequence(batch=2)
    mask[1, 2:4] = False  # sample 1: 6 vision tokens (2..3 are text or padding)
    module = make_transv()
    output, kept = module(hidden, mask)
    assert kept.tolist() == [
        [-1, 0, 1, 2, 4, 6, 8, 10, 11, 12],
        [0, 1, 2, 3, 4, 6, 8, 10, 11, 12],
    ]
    assert torch.equal(output[0, 0], torch.zeros(HIDDEN))
    assert torch.equal(output[0, 1:], hidden[0, kept[0, 1:]])


def test_a_sample_without_vision_tokens_is_kept_whole_and_unchanged():
    hidden, mask = sequence(batch=2)
    mask[1] = False
    module = make_transv()
    with torch.no_grad():
        module.alpha.fill_(0.7)
        output, kept = module(hidden, mask)
    assert kept[1].tolist() == list(range(hidden.shape[1]))
    assert torch.equal(output[1], hidden[1])
    assert bool(torch.isfinite(output).all())
