"""The teacher every layer test builds from: a real transformers Qwen2_5_VLAttention with the
text config of linvid's tiny Qwen2.5-VL (hidden 64, 4 heads, 2 kv heads, head_dim 16, 4 layers,
eager attention), and its causal output."""

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLAttention,
    Qwen2_5_VLRotaryEmbedding,
)

from linvid.models.tiny import tiny_qwen2_5_vl_config

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16


def text_config(**sizes):
    """The tiny Qwen2.5-VL's text config; sizes overrides tiny_qwen2_5_vl_config's keywords
    (hidden_size, num_heads, num_key_value_heads, num_layers)."""
    options = {
        "num_layers": 4,
        "hidden_size": HIDDEN,
        "num_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "attention_implementation": "eager",
    }
    return tiny_qwen2_5_vl_config(**(options | sizes)).text_config


def teacher_attention(
    seed: int = 0, layer_idx: int = 0, bias_std: float | None = None
) -> Qwen2_5_VLAttention:
    """A Qwen2.5-VL attention drawn from `seed`, in eval mode. With bias_std its q/k/v biases
    are redrawn from N(0, bias_std^2), so that copying them is visible (o_proj has none)."""
    torch.manual_seed(seed)
    attention = Qwen2_5_VLAttention(text_config(), layer_idx=layer_idx).eval()
    if bias_std is not None:
        with torch.no_grad():
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                projection.bias.normal_(0.0, bias_std)
    return attention


def teacher_output(
    attention: Qwen2_5_VLAttention, hidden: torch.Tensor, *, rotary: bool = True
) -> torch.Tensor:
    """The teacher's causal attention output (B, L, hidden) for hidden (B, L, hidden): with
    rotary, at text positions 0..L-1 (the same for all three M-RoPE sections), else with the
    identity rotary (cos 1, sin 0), as a mixer without positions sees the tokens."""
    batch, length, _ = hidden.shape
    if rotary:
        positions = torch.arange(length)[None, None].expand(3, batch, length)
        position_embeddings = Qwen2_5_VLRotaryEmbedding(attention.config)(hidden, positions)
    else:
        position_embeddings = (
            torch.ones(batch, length, HEAD_DIM),
            torch.zeros(batch, length, HEAD_DIM),
        )
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    output, _ = attention(hidden, attention_mask=causal, position_embeddings=position_embeddings)
    return output
