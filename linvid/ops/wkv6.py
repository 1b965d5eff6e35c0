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

from linvid.ops.decay import sum_after, sum_before
from linvid.ops.validation import check_positive_int, check_shape, check_tensor

DEFAULT_CHUNK_SIZE = 64
# Chunks processed together in one batched pass; bounds peak memory for very long sequences.
CHUNKS_PER_SEGMENT = 64


def _check_wkv6_inputs(r, k, v, w, u, initial_state, *, has_time: bool):
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
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4, "(B, H, K, V)")
        expected = (batch, heads, key_dim, v.shape[-1])
        check_shape("initial_state", initial_state, expected, "(B, H, K, V)")
    if bool((w > 0).any()):
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
    chunk_size: tokens per chunk (default 64); any size works, powers of two are fastest.
    Returns (o (B, T, H, V) in v's dtype, final_state (B, H, K, V) float32).
    """
    _check_wkv6_inputs(r, k, v, w, u, initial_state, has_time=True)
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    check_positive_int("chunk_size", chunk_size)
    batch, length, heads, key_dim = r.shape
    value_dim = v.shape[-1]
    state = _initial_state(initial_state, batch, heads, key_dim, value_dim, r.device)
    if length == 0:
        return v.new_zeros(v.shape), state

    # scale multiplies r (DESIGN.md), and o is linear in r.
    r32 = r.float() * scale if scale != 1.0 else r.float()
    bonus = (r32 * u.float() * k.float()).sum(-1, keepdim=True) * v.float()  # r @ (u*k)^T v

    # (B, T, H, D) -> (B, H, T, D) float32; pad T to whole chunks with tokens that change
    # nothing: k = v = 0 adds no state, w = 0 leaves it undecayed.
    padding = (-length) % chunk_size
    r32, k32, v32, w32 = (
        torch.nn.functional.pad(tensor.float().transpose(1, 2), (0, 0, 0, padding))
        for tensor in (r32, k, v, w)
    )
    output = r32.new_empty(batch, heads, length + padding, value_dim)
    segment = chunk_size * CHUNKS_PER_SEGMENT
    for start in range(0, length + padding, segment):
        part = slice(start, start + segment)
        output[:, :, part], state = _wkv6_segment(
            r32[:, :, part], k32[:, :, part], v32[:, :, part], w32[:, :, part], state, chunk_size
        )
    return (output[:, :, :length].transpose(1, 2) + bonus).to(v.dtype), state


def _wkv6_segment(r, k, v, w, state, chunk_size):
    """WKV over whole chunks. r, k, w: (B, H, L, K); v: (B, H, L, V); L a multiple of
    chunk_size; state (B, H, K, V). Returns (o without the bonus (B, H, L, V), final state)."""
    batch, heads, length, key_dim = r.shape
    value_dim = v.shape[-1]
    chunks = length // chunk_size
    r, k, w = (tensor.reshape(batch, heads, chunks, chunk_size, key_dim) for tensor in (r, k, w))
    v = v.reshape(batch, heads, chunks, chunk_size, value_dim)

    # Inter-chunk: o_t += (r_t * exp(b_{t-1})) @ S_start; the chunk adds
    # sum_s (k_s * exp(b_last - b_s))^T v_s to the state, which decays by exp(b_last).
    r_decayed = r * torch.exp(sum_before(w, dim=-2))
    k_to_end = k * torch.exp(sum_after(w, dim=-2))
    chunk_states = k_to_end.transpose(-1, -2) @ v  # (B, H, N, K, V)
    chunk_decay = torch.exp(w.sum(dim=3)).unsqueeze(-1)  # (B, H, N, K, 1)
    start_states = []
    for index in range(chunks):
        start_states.append(state)
        state = chunk_decay[:, :, index] * state + chunk_states[:, :, index]
    output = r_decayed @ torch.stack(start_states, dim=2)

    output = output + _intra_chunk(r, k, v, w)
    return output.reshape(batch, heads, length, value_dim), state


def _intra_chunk(r, k, v, w):
    """sum_{s < t in the same chunk} (sum_k r_t k_s exp(b_{t-1} - b_s)) v_s, for every t.

    r, k, w: (B, H, N, C, K); v: (B, H, N, C, V). Returns (B, H, N, C, V).

    Divide and conquer: at each level the chunk is cut into blocks of 2h tokens; every pair with
    s in a block's left half and t in its right half is split at the last token of the left
    half, so exp(b_{t-1} - b_s) = exp(w summed over the right half before t) * exp(w summed
    over the left half after s): a row factor times a column factor, both <= 1, and the pairs
    of the level become one batched matmul. Levels h = 1, 2, 4, ... cover every pair once.
    """
    *lead, chunk_size, key_dim = r.shape
    value_dim = v.shape[-1]
    # Pad each chunk at its end to a power of two with tokens that read and write nothing.
    size = 1 << (chunk_size - 1).bit_length()
    if size != chunk_size:
        padding = (0, 0, 0, size - chunk_size)
        r, k, v, w = (torch.nn.functional.pad(tensor, padding) for tensor in (r, k, v, w))
    output = torch.zeros(*lead, size, value_dim, dtype=v.dtype, device=v.device)
    half = 1
    while half < size:
        blocks = (*lead, size // (2 * half), 2, half)
        r_right = r.reshape(*blocks, key_dim)[..., 1, :, :]
        k_left = k.reshape(*blocks, key_dim)[..., 0, :, :]
        v_left = v.reshape(*blocks, value_dim)[..., 0, :, :]
        if half == 1:  # no decay inside a one-token half: exp(b_{t-1} - b_{t-1}) = 1
            transfer = (r_right * k_left).sum(-1, keepdim=True) * v_left
        else:
            w_blocks = w.reshape(*blocks, key_dim)
            rows = r_right * torch.exp(sum_before(w_blocks[..., 1, :, :], dim=-2))
            columns = k_left * torch.exp(sum_after(w_blocks[..., 0, :, :], dim=-2))
            transfer = (rows @ columns.transpose(-1, -2)) @ v_left
        # transfer lands on the right halves; the left halves receive nothing at this level.
        output.view(*blocks, value_dim)[..., 1, :, :] += transfer
        half *= 2
    return output[..., :chunk_size, :]
