"""TransV (paper 002 §3.2, eq. 5-6): drop a fraction of the vision tokens at a decoder layer and
transfer what the dropped tokens carried into the instruction tokens with a gated
cross-attention, so that every later layer runs on a shorter sequence.

    TD(X_0) = Uniform(X_0, T_d)                         uni     (eq. 5)
            = TopK(X_0, -Attn(X_T1, X_0), T_d)          attn
    X_1 <- X_1 + tanh(alpha) * CrossAttn(X_1, TD(X_0))          (eq. 6)

X_0: the vision tokens, X_1: the instruction tokens (text after the last vision token), X_T1:
the last instruction token, T_d = floor(p * T_0) dropped tokens. The token selection is plain
functions (`uniform_keep`, `attention_keep`); the module only moves tokens and transfers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from linvid.layers.attention_weights import (
    AttentionGeometry,
    add_attention_projections,
    copy_attention_projections,
    to_teacher,
)
from linvid.layers.base import check_hidden_states, check_token_mask

MODES = ("uniform", "attention")


def check_drop(drop) -> float:
    """Require a drop rate p in [0, 1) (p = 1 would leave a video without any token)."""
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop < 1:
        raise ValueError(f"TransV drop rate p must be a number in [0, 1), got {drop!r}")
    return float(drop)


def dropped_count(count: int, drop: float) -> int:
    """T_d = floor(p * T_0) of paper 002 eq. 5: how many of `count` vision tokens are dropped."""
    return math.floor(check_drop(drop) * count)


def uniform_keep(count: int, drop: float, device=None) -> torch.Tensor:
    """Uniform(X, T_d) of paper 002 eq. 5: (count - T_d,) long, the evenly spaced indices of the
    kept tokens among `count` (floor(i * count / kept); p = 0.5 keeps every second token)."""
    kept = count - dropped_count(count, drop)
    return torch.div(torch.arange(kept, device=device) * count, max(kept, 1), rounding_mode="floor")


def attention_keep(scores: torch.Tensor, drop: float) -> torch.Tensor:
    """TopK(X, -Attn(X_T1, X), T_d) of paper 002 eq. 5: the kept tokens are the count - T_d most
    attended ones. scores: (B, N) attention of the last instruction token to the N vision
    tokens. Returns (B, N - T_d) long indices, ascending (kept tokens keep their order)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    kept = scores.shape[1] - dropped_count(scores.shape[1], drop)
    return scores.topk(kept, dim=1).indices.sort(dim=1).values


class TransV(nn.Module):
    """Vision-token dropping plus gated cross-attention transfer (paper 002 eq. 5-6).

    hidden_states are the residual stream entering the decoder layer; the cross-attention reads
    them through `norm` (the layer's input_layernorm, held, not registered: the decoder layer
    owns it), with the teacher attention's head layout (H query heads, H_kv key/value heads,
    scale 1/sqrt(head_dim)) and no rotary embedding (the dropped tokens are a set, not a
    sequence the instruction continues). alpha: one learnable scalar, 0 at init, so the
    transfer adds exactly 0 until it is trained.

    Init: q/k/v/o from the layer's attention (`from_attention`) or nn.Linear's default.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_key_value_heads: int,
        head_dim: int,
        norm: nn.Module,
        *,
        drop: float,
        mode: str = "uniform",
        projection_bias: bool = False,
        output_bias: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown TransV mode {mode!r}; expected one of {MODES}")
        self.drop = check_drop(drop)
        self.mode = mode
        add_attention_projections(
            self,
            hidden_size,
            num_heads,
            num_key_value_heads,
            head_dim,
            projection_bias=projection_bias,
            output_bias=output_bias,
        )
        self.alpha = nn.Parameter(torch.zeros(1))
        object.__setattr__(self, "norm", norm)

    @classmethod
    def from_attention(
        cls, attention: nn.Module, config, norm: nn.Module, *, drop: float, mode: str = "uniform"
    ) -> TransV:
        """Build with W_Q, W_K, W_V, W_O (and biases) copied from a decoder layer's attention.
        config: the text config; norm: that layer's input_layernorm."""
        geometry = AttentionGeometry.read(attention, config)
        module = cls(
            geometry.hidden_size,
            geometry.num_heads,
            geometry.num_key_value_heads,
            geometry.head_dim,
            norm,
            drop=drop,
            mode=mode,
            projection_bias=geometry.projection_bias,
            output_bias=geometry.output_bias,
        )
        with torch.no_grad():
            copy_attention_projections(module, attention)
        return to_teacher(module, attention)

    def select(self, vision_count: int, scores: torch.Tensor | None, device) -> torch.Tensor:
        """(K,) indices of the kept tokens among one sample's vision tokens: evenly spaced
        ("uniform", or without scores) or the most attended ("attention"; scores (N,))."""
        if self.mode == "attention" and scores is not None:
            return attention_keep(scores[None], self.drop)[0]
        return uniform_keep(vision_count, self.drop, device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        vision_mask: torch.Tensor,
        scores: torch.Tensor | None = None,
        prompt_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop vision tokens and transfer them into the instruction tokens (paper 002 eq. 6).

        hidden_states: (B, L, hidden) residual stream; vision_mask: (B, L) bool; scores:
        (B, N_max) attention of the last instruction token to each sample's vision tokens, in
        order (mode "attention"; uniform without them); prompt_length: tokens from this
        position on are response tokens (teacher forcing): no transfer into them (default:
        all L tokens are the prompt). Left padding is allowed (padding precedes the vision
        tokens, so it is never an instruction token).
        Returns (hidden_states (B, L', hidden), kept (B, L') long): the positions in L of the
        kept tokens, ascending, right-aligned; samples that dropped fewer tokens than the
        most-dropping one keep L' = L - min T_d tokens, the others get new left padding: -1 in
        `kept`, zeros in hidden_states.
        """
        batch, length = check_hidden_states(hidden_states, self.hidden_size)
        check_token_mask("vision_mask", vision_mask, batch, length)
        counts = vision_mask.sum(dim=1).tolist()
        drops = [dropped_count(count, self.drop) for count in counts]
        device = hidden_states.device
        every = torch.arange(length, device=device).expand(batch, -1)
        if max(drops) == 0:
            return hidden_states, every
        # Positions of each sample's vision tokens, in order: row b's first counts[b] entries.
        vision_positions = torch.argsort((~vision_mask).to(torch.int8), dim=1, stable=True)
        keep = ~vision_mask
        for sample, count in enumerate(counts):
            if count:
                sample_scores = None if scores is None else scores[sample, :count]
                chosen = vision_positions[sample, self.select(count, sample_scores, device)]
                keep[sample, chosen] = True
        # Each row: its kept positions (ascending), then its dropped ones.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        new_length = length - min(drops)
        kept = torch.full((batch, new_length), -1, dtype=torch.long, device=device)
        dropped = torch.zeros(batch, max(drops), dtype=torch.long, device=device)
        dropped_valid = torch.zeros(batch, max(drops), dtype=torch.bool, device=device)
        for sample, drop in enumerate(drops):
            kept_count = length - drop
            kept[sample, new_length - kept_count :] = order[sample, :kept_count]
            dropped[sample, :drop] = order[sample, kept_count:]
            dropped_valid[sample, :drop] = True

        # Instruction tokens: text after each sample's last vision token, before the response.
        last_vision = torch.where(vision_mask, every, -1).amax(dim=1, keepdim=True)
        instruction = (every > last_vision) & (last_vision >= 0)
        if prompt_length is not None:
            instruction = instruction & (every < prompt_length)
        instruction = instruction & dropped_valid.any(dim=1, keepdim=True)
        instruction_count = int(instruction.sum(dim=1).max())
        if instruction_count > 0:
            hidden_states = self._transfer(
                hidden_states, dropped, dropped_valid, instruction, instruction_count
            )
        slots = (kept >= 0)[..., None]
        index = kept.clamp(min=0)[..., None].expand(-1, -1, self.hidden_size)
        return torch.where(slots, hidden_states.gather(1, index), 0.0), kept

    def _transfer(self, hidden_states, dropped, dropped_valid, instruction, instruction_count):
        """X_1 + tanh(alpha) * CrossAttn(X_1, TD(X_0)) written back at the instruction tokens."""
        batch = hidden_states.shape[0]
        hidden = self.hidden_size
        order = torch.argsort((~instruction).to(torch.int8), dim=1, stable=True)
        order = order[:, :instruction_count]
        valid = instruction.gather(1, order)[..., None]  # rows past a sample's instruction count
        query_index = order[..., None].expand(-1, -1, hidden)
        instruction_states = hidden_states.gather(1, query_index)  # (B, n, hidden)
        dropped_states = hidden_states.gather(1, dropped[..., None].expand(-1, -1, hidden))
        queries = self.query(self.norm(instruction_states))
        queries = queries.view(batch, instruction_count, self.num_heads, self.head_dim)
        normed = self.norm(dropped_states)
        heads = (batch, dropped.shape[1], self.num_key_value_heads, self.head_dim)
        keys = self.key(normed).view(heads).transpose(1, 2)
        values = self.value(normed).view(heads).transpose(1, 2)
        # Samples that dropped nothing have no instruction rows (`instruction` excludes them);
        # their keys are all allowed so that no softmax runs over nothing (NaN in some SDPA
        # backends), and their outputs are discarded.
        allowed = dropped_valid | ~dropped_valid.any(dim=1, keepdim=True)
        attended = nn.functional.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys,
            values,
            attn_mask=allowed[:, None, None, :],
            enable_gqa=self.num_heads != self.num_key_value_heads,
        )  # (B, H, n, head_dim)
        attended = attended.transpose(1, 2).reshape(batch, instruction_count, -1)
        transfer = torch.tanh(self.alpha) * self.output(attended)
        updated = torch.where(valid, instruction_states + transfer, instruction_states)
        # Rows past a sample's instruction count point at other tokens: written back unchanged.
        return hidden_states.scatter(1, query_index, updated)
