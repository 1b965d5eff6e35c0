"""Distillation losses against direct float64 restatements of the paper equations (paper 000
eq. 15-16, paper 003 eq. 6-9), plus the conventions callers rely on: the next-token shift,
masked tokens not contributing, empty masks, chunking, bf16 inputs and argument errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from linvid.distill.losses import (
    IGNORE_INDEX,
    LOSS_FUNCTIONS,
    combined_ce_kl,
    cross_entropy,
    hidden_mse,
    sequence_kd,
    token_kl,
    weighted_total,
)


def make_logits(batch=2, length=7, vocab=11, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, length, vocab, generator=generator)
    teacher = scale * torch.randn(batch, length, vocab, generator=generator)
    mask = torch.rand(batch, length, generator=generator) > 0.4
    mask[0, 3] = True
    return student, teacher, mask


def reference_kl(student, teacher, mask, temperature=1.0):
    """tau^2 / T * sum over scored tokens of sum_v p_T log(p_T / p_S), loops in float64."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(1, student.shape[1]):
            if not mask[b, t]:
                continue
            z_s = student[b, t - 1].double() / temperature
            z_t = teacher[b, t - 1].double() / temperature
            p_s = torch.exp(z_s) / torch.exp(z_s).sum()
            p_t = torch.exp(z_t) / torch.exp(z_t).sum()
            total += float((p_t * torch.log(p_t / p_s)).sum())
            count += 1
    return temperature**2 * total / count


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_token_kl_matches_float64_formula(temperature):
    student, teacher, mask = make_logits()
    value = token_kl(student, teacher, mask, temperature=temperature)
    assert value.dtype == torch.float32 and value.ndim == 0
    expected = reference_kl(student, teacher, mask, temperature)
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_token_kl_is_zero_for_equal_logits_and_positive_otherwise():
    student, teacher, mask = make_logits()
    assert token_kl(student, student.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert token_kl(student, teacher, mask).item() > 0.1


def test_token_kl_temperature_softens_and_scales_by_tau_squared():
    student, teacher, mask = make_logits()
    # Dividing logits by tau then using tau=1 is the same softened KL without the tau^2 factor.
    for temperature in (0.5, 2.0, 4.0):
        softened = token_kl(student / temperature, teacher / temperature, mask)
        scaled = token_kl(student, teacher, mask, temperature=temperature)
        assert scaled.item() == pytest.approx(temperature**2 * softened.item(), rel=1e-5)
    # Softer distributions are closer: the KL before the tau^2 factor shrinks with tau.
    raw = [token_kl(student, teacher, mask, temperature=t).item() / t**2 for t in (1, 2, 4)]
    assert raw[0] > raw[1] > raw[2]


def test_token_kl_ignores_unmasked_positions_and_the_last_position():
    student, teacher, mask = make_logits()
    value = token_kl(student, teacher, mask)
    # Position t - 1 is scored when mask[:, t]; change every other position, including the
    # last one (it predicts a token after the sequence) and mask column 0 (nothing predicts it).
    scored_positions = torch.zeros_like(mask)
    scored_positions[:, :-1] = mask[:, 1:]
    changed_student, changed_teacher = student.clone(), teacher.clone()
    changed_student[~scored_positions] = 100 * torch.randn_like(student[~scored_positions])
    changed_teacher[~scored_positions] = -50.0
    changed_mask = mask.clone()
    changed_mask[:, 0] = ~mask[:, 0]
    assert torch.equal(token_kl(changed_student, changed_teacher, changed_mask), value)


def test_token_kl_mean_is_over_tokens_of_the_whole_batch():
    student, teacher, _ = make_logits(batch=2, length=5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = True
    mask[1, 1:] = True
    single = [token_kl(student[b : b + 1], teacher[b : b + 1], mask[b : b + 1]) for b in (0, 1)]
    expected = (1 * single[0] + 4 * single[1]) / 5
    assert token_kl(student, teacher, mask).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_empty_mask_gives_zero_and_zero_gradients(chunk_size):
    student, teacher, mask = make_logits()
    student.requires_grad_(True)
    empty = torch.zeros_like(mask)
    empty[:, 0] = True  # column 0 is never scored
    value = token_kl(student, teacher, empty, temperature=2.0, chunk_size=chunk_size)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))

    logits = student.detach().clone().requires_grad_(True)
    labels = torch.full(mask.shape, IGNORE_INDEX)
    labels[:, 0] = 1
    ce = cross_entropy(logits, labels, chunk_size=chunk_size)
    ce.backward()
    assert ce.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1000])
def test_chunked_equals_unchunked_values_and_gradients(chunk_size):
    student, teacher, mask = make_logits(batch=3, length=9, vocab=13)
    labels = torch.randint(0, 13, mask.shape)
    labels[~mask] = IGNORE_INDEX

    def run(size):
        s = student.clone().requires_grad_(True)
        t = teacher.clone().requires_grad_(True)
        kl = token_kl(s, t, mask, temperature=2.0, chunk_size=size)
        ce = cross_entropy(s, labels, chunk_size=size)
        (kl + ce).backward()
        return kl.detach(), ce.detach(), s.grad, t.grad

    for whole, chunked in zip(run(None), run(chunk_size), strict=True):
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)


def test_no_grad_chunking_and_bf16_inputs():
    student, teacher, mask = make_logits(vocab=64, scale=20.0)
    expected = token_kl(student, teacher, mask, temperature=2.0)
    student_bf16, teacher_bf16 = student.bfloat16(), teacher.bfloat16()
    with torch.no_grad():
        value = token_kl(student_bf16, teacher_bf16, mask, temperature=2.0, chunk_size=2)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    # The only difference is bf16 rounding of the inputs; the math itself ran in float32.
    rounded = token_kl(student_bf16.float(), teacher_bf16.float(), mask, temperature=2.0)
    assert value.item() == pytest.approx(rounded.item(), rel=1e-5)
    assert value.item() == pytest.approx(expected.item(), rel=0.1)

    logits = student_bf16.clone().requires_grad_(True)
    labels = torch.randint(0, 64, mask.shape)
    ce = cross_entropy(logits, labels, chunk_size=3)
    ce.backward()
    assert ce.dtype == torch.float32 and torch.isfinite(ce)
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()


def test_large_logits_stay_finite():
    student, teacher, mask = make_logits(scale=1e4)
    value = token_kl(student, teacher, mask)
    labels = torch.randint(0, student.shape[-1], mask.shape)
    assert torch.isfinite(value) and torch.isfinite(cross_entropy(student, labels))


def test_teacher_zero_probabilities_contribute_nothing():
    student, teacher, mask = make_logits()
    teacher = teacher.clone()
    teacher[..., :3] = -math.inf
    value = token_kl(student, teacher, mask)
    assert torch.isfinite(value)
    # KL only sees the teacher's support; on it the student's distribution is renormalised
    # by the full softmax, which the reference computes from the full student logits.
    log_q = torch.log_softmax(student.double(), -1)[..., 3:]
    log_p = torch.log_softmax(teacher.double()[..., 3:], -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)[:, :-1]
    expected = per_position[mask[:, 1:]].mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck_float64(chunk_size):
    student, teacher, mask = make_logits(batch=2, length=4, vocab=5, scale=1.0)
    student = student.double().requires_grad_(True)
    teacher = teacher.double().requires_grad_(True)
    labels = torch.randint(0, 5, mask.shape)
    labels[0, 2] = IGNORE_INDEX
    assert torch.autograd.gradcheck(
        lambda s, t: token_kl(s, t, mask, temperature=1.7, chunk_size=chunk_size),
        (student, teacher),
    )
    assert torch.autograd.gradcheck(
        lambda s: cross_entropy(s, labels, chunk_size=chunk_size), (student,)
    )
    hidden = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, t: hidden_mse(h, t, mask), (hidden, target))


def test_cross_entropy_matches_torch_with_the_causal_shift():
    student, _, _ = make_logits(batch=3, length=8, vocab=17)
    labels = torch.randint(0, 17, (3, 8))
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[2, 6:] = IGNORE_INDEX  # padding
    expected = F.cross_entropy(
        student[:, :-1].reshape(-1, 17), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert cross_entropy(student, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    # The label at column 0 is never scored; the logits at the last position never are either.
    changed_labels, changed_logits = labels.clone(), student.clone()
    changed_labels[:, 0] = 5
    changed_logits[:, -1] = 1e3
    assert torch.equal(
        cross_entropy(changed_logits, changed_labels), cross_entropy(student, labels)
    )


def test_cross_entropy_matches_transformers_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    student, _, _ = make_logits(batch=2, length=6, vocab=9)
    labels = torch.randint(0, 9, (2, 6))
    labels[0, :2] = IGNORE_INDEX
    expected = ForCausalLMLoss(student, labels, vocab_size=9)
    assert cross_entropy(student, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sequence_kd_is_cross_entropy_on_teacher_tokens():
    student, teacher, _ = make_logits(batch=2, length=6, vocab=9)
    teacher_tokens = teacher.argmax(-1)  # teacher_tokens[:, t + 1] = greedy decode at t
    decode_labels = torch.full((2, 6), IGNORE_INDEX)
    decode_labels[:, 3:] = teacher_tokens[:, 2:-1]
    assert sequence_kd is cross_entropy
    log_probs = torch.log_softmax(student.double(), -1)
    expected = -torch.stack(
        [log_probs[b, t - 1, decode_labels[b, t]] for b in range(2) for t in range(3, 6)]
    ).mean()
    assert sequence_kd(student, decode_labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_hidden_mse_with_and_without_mask():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 4, generator=generator)
    teacher = torch.randn(2, 5, 4, generator=generator)
    # "mean" is F.mse_loss; the default, paper 003 eq. 6, sums over the D = 4 channels.
    assert hidden_mse(student, teacher, reduction="mean").item() == pytest.approx(
        F.mse_loss(student, teacher).item(), rel=1e-6
    )
    assert hidden_mse(student, teacher).item() == pytest.approx(
        4 * F.mse_loss(student, teacher).item(), rel=1e-6
    )
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    expected = ((student - teacher).double() ** 2).sum(-1)[mask].mean()  # eq. 6: 1/N sum_t
    value = hidden_mse(student, teacher, mask)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert hidden_mse(student, teacher, mask, reduction="mean").item() == pytest.approx(
        expected.item() / 4, rel=1e-6
    )
    with pytest.raises(ValueError, match=r"unknown hidden-loss reduction 'sum'; expected one of"):
        hidden_mse(student, teacher, reduction="sum")
    # Unmasked positions do not contribute, no shift is applied.
    changed = student.clone()
    changed[~mask] = 1e3
    assert torch.equal(hidden_mse(changed, teacher, mask), value)
    # bf16 inputs are compared in float32; an empty mask gives 0 with zero gradients.
    assert hidden_mse(student.bfloat16(), teacher.bfloat16(), mask).dtype == torch.float32
    leaf = student.clone().requires_grad_(True)
    empty = hidden_mse(leaf, teacher, torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_combined_ce_kl_is_alpha_ce_plus_beta_kl():
    student, teacher, mask = make_logits()
    labels = torch.randint(0, student.shape[-1], mask.shape)
    labels[~mask] = IGNORE_INDEX
    ce = cross_entropy(student, labels)
    kl = token_kl(student, teacher, mask, temperature=2.0)
    for alpha, beta in [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (0.3, 2.0)]:
        value = combined_ce_kl(
            student, teacher, labels, mask, alpha=alpha, beta=beta, temperature=2.0
        )
        assert value.item() == pytest.approx(alpha * ce.item() + beta * kl.item(), rel=1e-6)
    # Without a mask the KL scores the same tokens as the labels.
    default = combined_ce_kl(student, teacher, labels, alpha=0.5, beta=0.5, temperature=2.0)
    assert default.item() == pytest.approx(0.5 * ce.item() + 0.5 * kl.item(), rel=1e-6)


def test_weighted_total_and_registry():
    assert LOSS_FUNCTIONS["kl"] is token_kl and LOSS_FUNCTIONS["hidden"] is hidden_mse
    assert LOSS_FUNCTIONS["sequence"] is LOSS_FUNCTIONS["ce"] is cross_entropy
    values = {"kl": torch.tensor(2.0), "hidden": torch.tensor(4.0), "ce": torch.tensor(1.0)}
    total = weighted_total(values, {"kl": 0.5, "hidden": 0.5, "ce": 2.0})
    assert total.item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="unknown loss 'kld'"):
        weighted_total({"kld": torch.tensor(1.0)}, {"kld": 1.0})
    with pytest.raises(ValueError, match="same non-empty set"):
        weighted_total({"kl": torch.tensor(1.0)}, {"kl": 1.0, "ce": 1.0})


def test_shape_and_argument_errors_name_the_argument():
    student, teacher, mask = make_logits(batch=2, length=7, vocab=11)
    labels = torch.zeros(2, 7, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher_logits"):
        token_kl(student, teacher[..., :-1], mask)
    with pytest.raises(ValueError, match="student_logits"):
        token_kl(student[0], teacher, mask)
    with pytest.raises(ValueError, match="mask"):
        token_kl(student, teacher, mask[:, :-1])
    with pytest.raises(ValueError, match="mask must be a bool"):
        token_kl(student, teacher, mask.long())
    with pytest.raises(ValueError, match="temperature"):
        token_kl(student, teacher, mask, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_kl(student, teacher, mask, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(student, labels[:, :-1])
    with pytest.raises(ValueError, match="labels must be an integer"):
        cross_entropy(student, labels.float())
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(student.argmax(-1), labels)
    with pytest.raises(ValueError, match="teacher_hidden"):
        hidden_mse(student, teacher[:, :-1])
    with pytest.raises(ValueError, match="mask"):
        hidden_mse(student, teacher, mask[:1])
    with pytest.raises(ValueError, match="labels"):
        combined_ce_kl(student, teacher, labels[:1], alpha=1.0, beta=1.0)


def test_chunking_saves_no_float32_vocabulary_rows_for_backward():
    """With chunk_size, autograd keeps only the input rows; float32 softmaxes are recomputed."""
    student, teacher, mask = make_logits(batch=2, length=16, vocab=50)
    student = student.bfloat16().requires_grad_(True)
    labels = torch.randint(0, 50, mask.shape)

    def saved_float32_rows(chunk_size):
        saved = []

        def pack(tensor):
            if tensor.dtype == torch.float32 and tensor.ndim == 2:
                saved.append(tensor.shape[0])
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            token_kl(student, teacher.bfloat16(), mask, temperature=2.0, chunk_size=chunk_size)
            cross_entropy(student, labels, chunk_size=chunk_size)
        return saved

    assert max(saved_float32_rows(None)) > 4
    assert saved_float32_rows(4) == []
