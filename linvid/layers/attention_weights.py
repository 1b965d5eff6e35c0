"""Reading a teacher's self-attention for weight reuse (paper 000 §4.3, paper 003 eq. 4-5;
MambaInLlama): its head geometry, checked against its q_proj/k_proj/v_proj/o_proj, and copies of
its projections into a student's, grouped-query key/value rows repeated per query head as
transformers' repeat_kv does (query head h reads kv head h // (H / H_kv)).

Every layer's `from_attention` goes through here: RWKV6TimeMix, GatedCrossAttention,
Mamba2Mixer and LinMU's M-MATE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from linvid.ops.validation import check_positive_int, describe

ModuleType = TypeVar("ModuleType", bound=nn.Module)


@dataclass(frozen=True)
class AttentionGeometry:
    """Head layout of a teacher attention, read from its text config and checked against its
    q_proj/k_proj/v_proj/o_proj (nn.Linear) shapes."""

    hidden_size: int
    num_heads: int
    num_key_value_heads: int
    head_dim: int
    projection_bias: bool  # any of q/k/v has a bias
    output_bias: bool

    @classmethod
    def read(cls, attention: nn.Module, config) -> AttentionGeometry:
        """config: the text config (hidden_size, num_attention_heads, optional
        num_key_value_heads, optional head_dim)."""
        for name in ("hidden_size", "num_attention_heads"):
            value = getattr(config, name, None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.{name} must be an int >= 1, got {value!r}")
        hidden_size = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"config.num_attention_heads ({num_heads}) must be a multiple of "
                f"config.num_key_value_heads ({num_kv_heads})"
            )
        expected = {
            "q_proj": (num_heads * head_dim, hidden_size),
            "k_proj": (num_kv_heads * head_dim, hidden_size),
            "v_proj": (num_kv_heads * head_dim, hidden_size),
            "o_proj": (hidden_size, num_heads * head_dim),
        }
        for name, shape in expected.items():
            projection = getattr(attention, name, None)
            if not isinstance(projection, nn.Linear):
                raise ValueError(
                    f"attention.{name} must be an nn.Linear, got {type(projection).__name__}"
                )
            if tuple(projection.weight.shape) != shape:
                raise ValueError(
                    f"attention.{name}.weight must have shape {shape} for hidden_size "
                    f"{hidden_size}, {num_heads} heads, {num_kv_heads} kv heads and head_dim "
                    f"{head_dim} (from config), got {describe(projection.weight)}"
                )
        return cls(
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            projection_bias=any(
                getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj")
            ),
            output_bias=attention.o_proj.bias is not None,
        )


def check_head_layout(
    hidden_size: int, num_heads: int, num_key_value_heads: int, head_dim: int
) -> None:
    """Require ints >= 1 and num_heads a multiple of num_key_value_heads (a layer's own
    arguments; AttentionGeometry checks a teacher's config)."""
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_heads", num_heads),
        ("num_key_value_heads", num_key_value_heads),
        ("head_dim", head_dim),
    ):
        check_positive_int(name, value)
    if num_heads % num_key_value_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_key_value_heads "
            f"({num_key_value_heads})"
        )


def repeat_heads(weight: torch.Tensor, head_dim: int, repeats: int) -> torch.Tensor:
    """Repeat each head's block of rows of a projection weight (H_kv*hd, D) or bias (H_kv*hd,)
    `repeats` times in a row, giving (H_kv*repeats*hd, ...): query head h reads kv head
    h // repeats, as transformers' repeat_kv does for grouped-query attention."""
    heads = weight.shape[0] // head_dim
    grouped = weight.reshape(heads, head_dim, *weight.shape[1:])
    return grouped.repeat_interleave(repeats, dim=0).reshape(-1, *weight.shape[1:])


@torch.no_grad()
def copy_projection(
    target: nn.Linear, source: nn.Linear, *, repeats: int = 1, head_dim: int | None = None
) -> None:
    """target's weight and bias <- source's; a target bias whose source has none gets 0.

    With repeats > 1, source is a key or value projection of H_kv heads of head_dim rows and
    target has H_kv * repeats heads: each head's rows are repeated (`repeat_heads`).
    """

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if repeats == 1 else repeat_heads(tensor, head_dim, repeats)

    target.weight.copy_(rows(source.weight))
    if source.bias is not None:
        target.bias.copy_(rows(source.bias))
    elif target.bias is not None:
        target.bias.zero_()


@torch.no_grad()
def add_attention_projections(
    module: nn.Module,
    hidden_size: int,
    num_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    *,
    projection_bias: bool,
    output_bias: bool,
) -> None:
    """Give `module` an attention's head layout (hidden_size, num_heads, num_key_value_heads,
    head_dim attributes) and its projections: query (hidden -> H*d), key and value
    (hidden -> H_kv*d), output (H*d -> hidden)."""
    check_head_layout(hidden_size, num_heads, num_key_value_heads, head_dim)
    module.hidden_size = hidden_size
    module.num_heads = num_heads
    module.num_key_value_heads = num_key_value_heads
    module.head_dim = head_dim
    module.query = nn.Linear(hidden_size, num_heads * head_dim, bias=projection_bias)
    module.key = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=projection_bias)
    module.value = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=projection_bias)
    module.output = nn.Linear(num_heads * head_dim, hidden_size, bias=output_bias)


def copy_attention_projections(module: nn.Module, attention: nn.Module) -> None:
    """Copy W_Q, W_K, W_V, W_O (and biases) of a teacher attention into the projections made by
    `add_attention_projections`, heads kept as they are (grouped-query stays grouped)."""
    copy_projection(module.query, attention.q_proj)
    copy_projection(module.key, attention.k_proj)
    copy_projection(module.value, attention.v_proj)
    copy_projection(module.output, attention.o_proj)


def value_head_scales(value: nn.Linear, head_dim: int, num_heads: int) -> torch.Tensor:
    """The scale of one teacher value vector per query head, as the weight of a per-head norm.

    value: the teacher's v_proj (H_kv*head_dim rows). Returns (num_heads * head_dim,) float32:
    for each query head, repeated over its head_dim channels, the root mean square of the
    value channels of the kv head it reads, on unit-variance inputs:
    sqrt((|W_V,h|_F^2 + |b_V,h|^2) / head_dim). A softmax average of value vectors is at most
    this large, so a normalised head times this weight is on (the upper end of) the teacher's
    scale.
    """
    weight = value.weight.float().unflatten(0, (-1, head_dim))  # (H_kv, head_dim, D)
    square = weight.square().sum((1, 2))
    if value.bias is not None:
        square += value.bias.float().unflatten(0, (-1, head_dim)).square().sum(1)
    scales = (square / head_dim).sqrt()  # (H_kv,)
    return scales.repeat_interleave(num_heads // scales.numel() * head_dim)


def to_teacher(module: ModuleType, attention: nn.Module) -> ModuleType:
    """`module` moved to the teacher attention's device and dtype (those of its q_proj)."""
    weight = attention.q_proj.weight
    return module.to(device=weight.device, dtype=weight.dtype)
