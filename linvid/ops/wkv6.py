"""RWKV-6 ("Finch") WKV: linear attention with data-dependent per-channel decay and a bonus
for the current token (paper 000 §4.2, paper 001 §3.2; Peng et al. 2024, eq. 16-19).

Per head, with row vectors r_t, k_t, w_t in R^K, v_t in R^V and state S in R^{K x V}:

    o_t = scale * r_t @ (S_{t-1} + (u * k_t)^T v_t)
    S_t = diag(exp(w_t)) @ S_{t-1} + k_t^T v_t            (w_t <= 0 is the LOG decay)

Three forms with one meaning: `wkv6_recurrent` (the per-token reference), `wkv6_chunk` (training
and prefill) and `wkv6_step` (decoding). States are float32 whatever the input dtype.

Why the chunked form is shaped the way it is: the textbook trick of folding the cumulative
decay into r and k (r * exp(b_t), k * exp(-b_s)) overflows as soon as a chunk's summed log
decay passes about -88. Here every exponent is a decay *relative to a point between the two
tokens it connects*, so it is <= 0 and every factor is <= 1:
  - across chunks, the state carries the decay exactly (exp of chunk-local partial sums);
  - inside a chunk, halves of ever larger blocks: a pair (t, s) with s in a block's left half
    and t in its right half is split at the left half's last token p, so
    exp(b_{t-1} - b_s) = exp(b_{t-1} - b_p) * exp(b_p - b_s), both factors <= 1, and every
    pair of a level is one batched matmul (`_intra_chunk`).
Each exponent is also summed from exactly the w it spans, never as the difference of two long
cumulative sums, so a large decay early in a chunk cannot erase the small ones after it.
This follows the stability rule of fla's chunk_rwkv6 kernels (decays relative to
sub-chunk boundaries), with a divide-and-conquer split that suits batched CPU/GPU matmuls.
"""

from __future__ import annotations

import torch

from linvid.ops.validation import check_positive_int, check_shape, check_tensor

DEFAULT_CHUNK_SIZE = 64
# Tokens processed together in one batched pass; bounds peak memory for very long sequences.
SEGMENT_TOKENS = 8192


def _check_wkv6_inputs(r, k, v, w, u, state, *, has_time: bool):
    """Validate the inputs of every form; `state` is `initial_state` (optional) of the sequence
    forms and the required `state` of the step."""
    layout = "(B, T, H, K)" if has_time else "(B, H, K)"
    ndim = 4 if has_time else 3
    check_tensor("r", r, ndim, layout)
    for name, tensor in (("k", k), ("w", w)):
        check_tensor(name, tensor, ndim, layout)
        check_shape(name, tensor, r.shape, layout + " like r")
    v_layout = "(B, T, H, V)" if has_time else "(B, H, V)"
    check_tensor("v", v, ndim, v_layout)
    if v.shape[:-1] != r.shape[:-1]:
        expected = (*r.shape[:-1], v.shape[-1])
        check_shape("v", v, expected, v_layout + " with B, T, H of r")
    batch, heads, key_dim = r.shape[0], r.shape[-2], r.shape[-1]
    check_tensor("u", u, 2, "(H, K)")
    check_shape("u", u, (heads, key_dim), "(H, K)")
    state_name = "initial_state" if has_time else "state"
    if state is not None or not has_time:
        check_tensor(state_name, state, 4, "(B, H, K, V)")
        expected = (batch, heads, key_dim, v.shape[-1])
        check_shape(state_name, state, expected, "(B, H, K, V)")
    if w.numel() and w.amax() > 0:
        raise ValueError(
            f"w is the log decay and must be <= 0 everywhere, got max {w.max().item():.4g} "
            "(pass w = -exp(decay_logits), not the decay itself)"
        )


def wkv6_step(r, k, v, w, u, state, *, scale: float = 1.0):
    """One decoding step of RWKV-6 WKV.

    r, k, w: (B, H, K); v: (B, H, V); u: (H, K); state: (B, H, K, V) float32.
    Returns (o (B, H, V) in v's dtype, new state (B, H, K, V) float32).
    """
    _check_wkv6_inputs(r, k, v, w, u, state, has_time=False)
    output, state = _wkv6_update(
        r.float(), k.float(), v.float(), w.float(), u.float(), state.float(), scale
    )
    return output.to(v.dtype), state


def wkv6_step_trusted(r, k, v, w, u, state, *, scale: float = 1.0):
    """wkv6_step without its input checks, for a caller that guarantees them (the decoding hot
    path of RWKV6TimeMix, whose w = -exp(...) is <= 0 by construction): r, k, w (B, H, K),
    v (B, H, V), u (H, K), state (B, H, K, V), all float32. Returns (o (B, H, V), new state
    (B, H, K, V)), float32, the same sums as wkv6_step with fewer tensor operations (matmul
    instead of einsum, the state update k^T v fused into one addcmul)."""
    bonus = (r * u * k).sum(-1, keepdim=True) * v  # r @ ((u * k)^T v)
    output = (r.unsqueeze(-2) @ state).squeeze(-2) + bonus
    if scale != 1.0:
        output = scale * output
    state = torch.addcmul(torch.exp(w).unsqueeze(-1) * state, k.unsqueeze(-1), v.unsqueeze(-2))
    return output, state


def _wkv6_update(r, k, v, w, u, state, scale):
    """The recurrence for one token on float32 tensors shaped as in wkv6_step."""
    kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # k^T v: (B, H, K, V)
    bonus = (r * u * k).sum(-1, keepdim=True) * v  # r @ ((u * k)^T v)
    output = scale * (torch.einsum("bhk,bhkv->bhv", r, state) + bonus)
    return output, torch.exp(w).unsqueeze(-1) * state + kv


def wkv6_recurrent(r, k, v, w, u, *, scale: float = 1.0, initial_state=None):
    """Per-token reference of RWKV-6 WKV (the test oracle; fla's naive_recurrent_rwkv6).

    r, k, w: (B, T, H, K); v: (B, T, H, V); u: (H, K); initial_state: (B, H, K, V) or None.
    Returns (o (B, T, H, V) in v's dtype, final_state (B, H, K, V) float32).
    """
    _check_wkv6_inputs(r, k, v, w, u, initial_state, has_time=True)
    batch, length, heads, key_dim = r.shape
    state = _initial_state(initial_state, batch, heads, key_dim, v.shape[-1], r.device)
    r32, k32, v32, w32, u32 = (tensor.float() for tensor in (r, k, v, w, u))
    outputs = []
    for t in range(length):
        output, state = _wkv6_update(r32[:, t], k32[:, t], v32[:, t], w32[:, t], u32, state, scale)
        outputs.append(output)
    if not outputs:
        return v.new_zeros(v.shape), state
    return torch.stack(outputs, dim=1).to(v.dtype), state


def _initial_state(initial_state, batch, heads, key_dim, value_dim, device):
    if initial_state is None:
        return torch.zeros(batch, heads, key_dim, value_dim, device=device, dtype=torch.float32)
    return initial_state.float()


def wkv6_chunk(
    r, k, v, w, u, *, scale: float = 1.0, initial_state=None, chunk_size: int | None = None
):
    """Chunked RWKV-6 WKV for training and prefill; exact for log decays down to -20 per step
    (and beyond: every exponent taken is <= 0), differentiable by ordinary autograd.

    r, k, w: (B, T, H, K); v: (B, T, H, V); u: (H, K); initial_state: (B, H, K, V) or None.
    chunk_size: tokens per chunk (default 64), rounded up to a power of two.
    Returns (o (B, T, H, V) in v's dtype, final_state (B, H, K, V) float32).
    """
    _check_wkv6_inputs(r, k, v, w, u, initial_state, has_time=True)
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    check_positive_int("chunk_size", chunk_size)
    chunk_size = 1 << (chunk_size - 1).bit_length()  # the halving inside chunks needs 2^n
    batch, length, heads, key_dim = r.shape
    value_dim = v.shape[-1]
    state = _initial_state(initial_state, batch, heads, key_dim, value_dim, r.device)
    if length == 0:
        return v.new_zeros(v.shape), state

    # scale multiplies r (DESIGN.md), and o is linear in r.
    r32 = r.float() * scale if scale != 1.0 else r.float()

    # (B, T, H, D) -> chunk-major (N, B, H, C, D) float32, so that a run of chunks is one
    # contiguous block; pad T to whole chunks with tokens that change nothing: k = v = 0 adds
    # no state, w = 0 leaves it undecayed.
    padding = (-length) % chunk_size
    chunks = (length + padding) // chunk_size

    def chunk_major(tensor):
        padded = torch.nn.functional.pad(tensor.float(), (0, 0, 0, 0, 0, padding))
        chunked = padded.reshape(batch, chunks, chunk_size, heads, tensor.shape[-1])
        return chunked.permute(1, 0, 3, 2, 4).contiguous()

    r32, k32, v32, w32 = (chunk_major(tensor) for tensor in (r32, k, v, w))
    output = r32.new_empty(chunks, batch, heads, chunk_size, value_dim)
    step = max(1, SEGMENT_TOKENS // chunk_size)
    for start in range(0, chunks, step):
        part = slice(start, start + step)
        output[part], state = _wkv6_segment(
            r32[part], k32[part], v32[part], w32[part], u.float(), state
        )
    output = output.permute(1, 0, 3, 2, 4).reshape(batch, chunks * chunk_size, heads, value_dim)
    return output[:, :length].to(v.dtype), state


def _wkv6_segment(r, k, v, w, u, state):
    """WKV over consecutive whole chunks. r, k, w: (N, B, H, C, K); v: (N, B, H, C, V) with C a
    power of two; u: (H, K); state (B, H, K, V) float32. Returns (o (N, B, H, C, V), state).

    Inside a chunk, divide and conquer: at level h the chunk is cut into blocks of 2h tokens,
    and every pair with s in a block's left half and t in its right half is split at the left
    half's last token: exp(b_{t-1} - b_s) = exp(w summed over the right half before t) *
    exp(w summed over the left half after s), a row factor times a column factor, both <= 1,
    so the level's pairs are one batched matmul. Levels h = 1, 2, 4, ... cover every pair once.
    The factors are carried from level to level inside r and k, multiplied by the decay of the
    neighbouring half; after the last level they are the chunk-level factors that pass the
    state between chunks.
    """
    *lead, chunk_size, key_dim = r.shape
    value_dim = v.shape[-1]
    # The current token's own term, r_t @ (u * k_t)^T v_t, starts the sum.
    output = (r * u[:, None, :] * k).sum(-1, keepdim=True) * v
    # r and k carry their decay factors, r_t * exp(w summed over t's current block before t)
    # and k_s * exp(w summed over s's current block after s): updated in place when no graph
    # is recorded (prefill), out of place for autograd.
    in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (r, k, v, w)))
    r_decayed, k_decayed = (r.clone(), k.clone()) if in_place else (r, k)
    block_log_decay = w  # (..., chunk_size / h, K): summed w of each current block
    half = 1
    while half < chunk_size:
        blocks = (*lead, chunk_size // (2 * half), 2, half)
        rows = r_decayed.view(*blocks, key_dim)[..., 1, :, :]  # right halves
        columns = k_decayed.view(*blocks, key_dim)[..., 0, :, :]  # left halves
        v_left = v.view(*blocks, value_dim)[..., 0, :, :]
        if half == 1:  # one-token halves: the pair (t, t-1) has no decay between them
            transfer = (rows * columns).sum(-1, keepdim=True) * v_left
        else:
            transfer = (rows @ columns.transpose(-1, -2)) @ v_left
        # transfer lands on the right halves; left halves receive nothing at this level.
        output.view(*blocks, value_dim)[..., 1, :, :] += transfer
        # Merge each pair of halves into one block of 2h: the right half's tokens now also
        # have the whole left half before them, the left half's the whole right half after.
        pair_decay = torch.exp(block_log_decay.view(*lead, -1, 2, 1, key_dim))
        if in_place:
            rows *= pair_decay[..., 0, :, :]
            columns *= pair_decay[..., 1, :, :]
        else:
            ones = torch.ones_like(pair_decay[..., :1, :, :])
            left_to_right = torch.cat((ones, pair_decay[..., :1, :, :]), -3)
            right_to_left = torch.cat((pair_decay[..., 1:, :, :], ones), -3)
            r_decayed = (r_decayed.view(*blocks, key_dim) * left_to_right).view_as(r)
            k_decayed = (k_decayed.view(*blocks, key_dim) * right_to_left).view_as(k)
        block_log_decay = block_log_decay.view(*lead, -1, 2, key_dim).sum(-2)
        half *= 2

    # Across chunks: o_t += (r_t * exp(b_{t-1})) @ S_start; the chunk adds
    # sum_s (k_s * exp(b_last - b_s))^T v_s to the state, which decays by exp(b_last).
    chunk_states = k_decayed.transpose(-1, -2) @ v  # (N, B, H, K, V)
    chunk_decay = torch.exp(block_log_decay).transpose(-1, -2)  # (N, B, H, K, 1)
    start_states = []
    # unbind, not indexing: the backward of one index per chunk would write a full-size zero
    # gradient per chunk, quadratic in the number of chunks.
    for decay, update in zip(chunk_decay.unbind(0), chunk_states.unbind(0), strict=True):
        start_states.append(state)
        state = decay * state + update
    output = output + r_decayed @ torch.stack(start_states)
    return output, state
