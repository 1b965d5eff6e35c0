"""Mamba-2 SSD (state space duality) with grouped B/C: the sequence mixer of TimeViper's
Mamba-2 layers (paper 002 §3.1) and of LinMU's Flex-MA branch (paper 003 eq. 1-2; Dao & Gu
2024, §6 "SSD algorithm").

Per head h, with x_t in R^P, B_t, C_t in R^N (read from group h // (H // G)), state h in
R^{P x N} and a_t = exp(dt_t * A_h):

    h_t = a_t * h_{t-1} + dt_t * outer(x_t, B_t)
    y_t = h_t @ C_t + D_h * x_t

Three forms with one meaning: `ssd_recurrent` (the per-token reference), `ssd_chunk` (training
and prefill) and `ssd_step` (decoding). States are float32 whatever the input dtype. The decay
is a scalar per head and step, so inside a chunk the pairwise decays form a (C, C) matrix per
head; its exponents are segment sums of exactly the steps they span (`segment_sum`), all <= 0.
"""

from __future__ import annotations

import torch

from linvid.ops.decay import segment_sum, sum_after
from linvid.ops.validation import check_positive_int, check_shape, check_tensor

DEFAULT_CHUNK_SIZE = 64


def _check_ssd_inputs(x, dt, A, B, C, D, state, *, has_time: bool):
    time = ", T" if has_time else ""
    ndim = 4 if has_time else 3
    check_tensor("x", x, ndim, f"(B{time}, H, P)")
    batch, heads = x.shape[0], x.shape[-2]
    leading = tuple(x.shape[:-1])
    check_tensor("dt", dt, ndim - 1, f"(B{time}, H)")
    check_shape("dt", dt, leading, f"(B{time}, H) of x")
    check_tensor("A", A, 1, "(H,)")
    check_shape("A", A, (heads,), "(H,) of x")
    check_tensor("B", B, ndim, f"(B{time}, G, N)")
    groups, state_dim = B.shape[-2], B.shape[-1]
    check_shape("B", B, (*leading[:-1], groups, state_dim), f"(B{time}, G, N) with B{time} of x")
    check_tensor("C", C, ndim, f"(B{time}, G, N)")
    check_shape("C", C, tuple(B.shape), f"(B{time}, G, N) like B")
    if groups == 0 or heads % groups != 0:
        raise ValueError(
            f"the number of heads H = {heads} (x {tuple(x.shape)}) must be divisible by the "
            f"number of B/C groups G = {groups} (B {tuple(B.shape)})"
        )
    if D is not None:
        check_tensor("D", D, 1, "(H,)")
        check_shape("D", D, (heads,), "(H,) of x")
    state_name = "initial_state" if has_time else "state"
    if state is not None or not has_time:
        check_tensor(state_name, state, 4, "(B, H, P, N)")
        check_shape(state_name, state, (batch, heads, x.shape[-1], state_dim), "(B, H, P, N)")
    if bool((A > 0).any()):
        raise ValueError(
            f"A must be <= 0 (a decay rate, A = -exp(A_log)), got max {A.max().item():.4g}"
        )
    if bool((dt < 0).any()):
        raise ValueError(
            f"dt must be >= 0 (softplus and dt_bias are applied by the layer), got min "
            f"{dt.min().item():.4g}"
        )


def ssd_step(x, dt, A, B, C, state, *, D=None):
    """One decoding step of Mamba-2 SSD.

    x: (B, H, P); dt: (B, H) positive; A: (H,) negative; B, C: (B, G, N); state: (B, H, P, N);
    D: (H,) or None. Returns (y (B, H, P) in x's dtype, new state (B, H, P, N) float32).
    """
    _check_ssd_inputs(x, dt, A, B, C, D, state, has_time=False)
    D32 = None if D is None else D.float()
    y, state = _ssd_update(
        x.float(), dt.float(), A.float(), B.float(), C.float(), D32, state.float()
    )
    return y.to(x.dtype), state


def ssd_step_grouped(x, dt, A, B, C, state, *, D=None):
    """ssd_step for a layer whose x and B are shared by the R = H / G heads of each group (a
    Mamba-2 mixer built from a grouped-query teacher), without repeating them to H heads:
    equal to ssd_step(x.repeat_interleave(R, 1), dt, A, B.repeat_interleave(R, 1), C, state,
    D=D) with C at H groups.

    x: (B, G, P); dt: (B, H) positive; A: (H,) negative; B: (B, G, N); C: (B, H, N); state:
    (B, H, P, N); D: (H,) or None; all float32. Returns (y (B, H, P), new state (B, H, P, N)),
    float32. Unchecked (the decoding hot path): the caller guarantees shapes, dtypes and signs.
    """
    batch, heads = dt.shape
    groups, head_dim = x.shape[1], x.shape[2]
    repeats = heads // groups
    state_dim = B.shape[-1]
    grouped = state.view(batch, groups, repeats, head_dim, state_dim)
    decay = torch.exp(dt * A).view(batch, groups, repeats, 1, 1)
    x_heads = x.view(batch, groups, 1, head_dim)
    inflow = (dt.view(batch, groups, repeats, 1) * x_heads).unsqueeze(-1)  # dt x: (.., P, 1)
    state = torch.addcmul(decay * grouped, inflow, B.view(batch, groups, 1, 1, state_dim))
    y = (state @ C.view(batch, groups, repeats, state_dim, 1)).squeeze(-1)  # (B, G, R, P)
    if D is not None:
        y = torch.addcmul(y, D.view(groups, repeats, 1), x_heads)
    return y.view(batch, heads, head_dim), state.view(batch, heads, head_dim, state_dim)


def _ssd_update(x, dt, A, B, C, D, state):
    """The recurrence for one token on float32 tensors shaped as in ssd_step."""
    repeats = x.shape[1] // B.shape[1]
    B_heads = B.repeat_interleave(repeats, dim=1)  # (B, H, N)
    C_heads = C.repeat_interleave(repeats, dim=1)
    decay = torch.exp(dt * A)[..., None, None]
    state = decay * state + (dt[..., None] * x).unsqueeze(-1) * B_heads.unsqueeze(-2)
    y = torch.einsum("bhpn,bhn->bhp", state, C_heads)
    if D is not None:
        y = y + D[:, None] * x
    return y, state


def ssd_recurrent(x, dt, A, B, C, *, D=None, initial_state=None):
    """Per-token reference of Mamba-2 SSD (the test oracle; mamba_ssm's selective_state_update
    applied token by token).

    x: (B, T, H, P); dt: (B, T, H); A: (H,); B, C: (B, T, G, N); D: (H,) or None;
    initial_state: (B, H, P, N) or None. Returns (y (B, T, H, P), final_state (B, H, P, N)).
    """
    _check_ssd_inputs(x, dt, A, B, C, D, initial_state, has_time=True)
    state = _initial_state(initial_state, x, B)
    x32, dt32, A32, B32, C32 = (tensor.float() for tensor in (x, dt, A, B, C))
    D32 = None if D is None else D.float()
    outputs = []
    for t in range(x.shape[1]):
        y, state = _ssd_update(x32[:, t], dt32[:, t], A32, B32[:, t], C32[:, t], D32, state)
        outputs.append(y)
    if not outputs:
        return x.new_zeros(x.shape), state
    return torch.stack(outputs, dim=1).to(x.dtype), state


def _initial_state(initial_state, x, B):
    if initial_state is not None:
        return initial_state.float()
    batch, _, heads, head_dim = x.shape
    return torch.zeros(batch, heads, head_dim, B.shape[-1], device=x.device, dtype=torch.float32)


def ssd_chunk(x, dt, A, B, C, *, D=None, initial_state=None, chunk_size: int | None = None):
    """Chunked Mamba-2 SSD for training and prefill (any T), differentiable by autograd.

    x: (B, T, H, P); dt: (B, T, H) positive; A: (H,) negative; B, C: (B, T, G, N), head h
    reads group h // (H // G); D: (H,) or None; initial_state: (B, H, P, N) or None;
    chunk_size: tokens per chunk (default 64).
    Returns (y (B, T, H, P) in x's dtype, final_state (B, H, P, N) float32).
    """
    _check_ssd_inputs(x, dt, A, B, C, D, initial_state, has_time=True)
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    check_positive_int("chunk_size", chunk_size)
    batch, length, heads, head_dim = x.shape
    groups, state_dim = B.shape[2], B.shape[3]
    repeats = heads // groups
    state = _initial_state(initial_state, x, B)
    if length == 0:
        return x.new_zeros(x.shape), state

    # Pad T to whole chunks with dt = 0: no decay and no input, so the final state is exact.
    padding = (-length) % chunk_size
    chunks = (length + padding) // chunk_size

    def chunked(tensor):  # (B, T, ...) -> (B, N_chunks, C, ...) float32, padded with zeros
        padded = torch.nn.functional.pad(tensor.float(), (0, 0) * (tensor.ndim - 2) + (0, padding))
        return padded.reshape(batch, chunks, chunk_size, *tensor.shape[2:])

    grouped = (batch, chunks, chunk_size, groups, repeats)
    x_chunks = chunked(x).reshape(*grouped, head_dim).permute(0, 3, 4, 1, 2, 5)  # (B,G,R,N,C,P)
    dt_chunks = chunked(dt).reshape(grouped).permute(0, 3, 4, 1, 2)  # (B, G, R, N, C)
    log_decay = dt_chunks * A.float().reshape(1, groups, repeats, 1, 1)
    B_chunks = chunked(B).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (B, G, 1, N, C, N_state)
    C_chunks = chunked(C).permute(0, 3, 1, 2, 4).unsqueeze(2)

    # Inside each chunk: y_t += sum_{s <= t} (C_t . B_s) exp(sum_{s<j<=t} dt_j A) dt_s x_s.
    scores = (C_chunks @ B_chunks.transpose(-1, -2)) * torch.exp(segment_sum(log_decay))
    y = (scores * dt_chunks.unsqueeze(-2)) @ x_chunks

    # Across chunks: each chunk adds sum_s exp(sum_{j>s} dt_j A) dt_s x_s B_s^T to the state,
    # which decays by the chunk's whole product; y_t reads exp(sum_{j<=t} dt_j A) C_t h_start.
    weights = (dt_chunks * torch.exp(sum_after(log_decay, dim=-1))).unsqueeze(-1)
    chunk_states = (x_chunks * weights).transpose(-1, -2) @ B_chunks  # (B, G, R, N, P, N_state)
    chunk_decay = torch.exp(log_decay.sum(-1))[..., None, None]  # (B, G, R, N, 1, 1)
    state = state.reshape(batch, groups, repeats, head_dim, state_dim)
    start_states = []
    # unbind, not indexing: the backward of one index per chunk would write a full-size zero
    # gradient per chunk, quadratic in the number of chunks.
    for decay, update in zip(chunk_decay.unbind(3), chunk_states.unbind(3), strict=True):
        start_states.append(state)
        state = decay * state + update
    start_states = torch.stack(start_states, dim=3)  # (B, G, R, N, P, N_state)
    decay_from_start = torch.exp(log_decay.cumsum(-1)).unsqueeze(-1)
    y = y + (C_chunks @ start_states.transpose(-1, -2)) * decay_from_start

    if D is not None:
        y = y + D.float().reshape(groups, repeats, 1, 1, 1) * x_chunks
    y = y.movedim((3, 4), (1, 2)).reshape(batch, length + padding, heads, head_dim)
    return y[:, :length].to(x.dtype), state.reshape(batch, heads, head_dim, state_dim)
