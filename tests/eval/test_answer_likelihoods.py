"""`answer_log_likelihoods` (linvid/eval/options.py) against an explicit loop, on a batch whose
rows start their answers at different positions, and the message for a question without a
prompt: the cases the mutation run (docs/mutation.md) found unguarded. The model is a tiny
causal stand-in (running sums of embeddings, so each position's logits depend on its whole
prefix) that honours `logits_to_keep` as transformers' models do."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from linvid.distill.data import IGNORE_INDEX
from linvid.eval.options import _prompt_of, answer_log_likelihoods

VOCABULARY = 11


class PrefixModel(nn.Module):
    """logits[b, p] = head(sum of the embeddings of tokens 0..p of row b)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCABULARY, 8)
        self.head = nn.Linear(8, VOCABULARY)

    def forward(self, input_ids, attention_mask=None, use_cache=None, logits_to_keep=0):
        logits = self.head(self.embed(input_ids).cumsum(1))
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def explicit_sum(model, input_ids, labels) -> list[float]:
    """Each row's sum over labelled positions t of log p(labels[t] | tokens before t), from the
    full logits, one position at a time, in float64."""
    logits = model(input_ids).logits.double()
    sums = []
    for row in range(input_ids.shape[0]):
        total = 0.0
        for position in range(1, input_ids.shape[1]):
            target = int(labels[row, position])
            if target != IGNORE_INDEX:
                total += float(torch.log_softmax(logits[row, position - 1], -1)[target])
        sums.append(total)
    return sums


def test_rows_with_answers_at_different_positions_match_an_explicit_loop():
    """Row 0's answer starts at position 5, row 1's at 2 (and ends before the padding); the
    answers include token 0, a real token id (IGNORE_INDEX positions are the only ones to
    skip)."""
    input_ids = torch.tensor([[3, 4, 5, 6, 7, 0, 2, 1, 0], [9, 8, 0, 6, 10, 0, 0, 0, 0]])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 5:] = input_ids[0, 5:]
    labels[1, 2:5] = input_ids[1, 2:5]
    batch = {
        "input_ids": input_ids,
        "attention_mask": (torch.arange(9) < torch.tensor([[9], [5]])).long(),
        "labels": labels,
    }
    model = PrefixModel().eval()
    with torch.no_grad():
        scores = answer_log_likelihoods(model, batch)
        expected = explicit_sum(model, input_ids, labels)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    torch.testing.assert_close(
        scores.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5
    )
    # Only the labelled tokens count: relabelling row 1's padding changes nothing.
    with torch.no_grad():
        again = answer_log_likelihoods(model, {**batch, "input_ids": input_ids.clone()})
    assert torch.equal(again, scores)


def test_a_question_without_a_prompt_gets_the_whole_message():
    class Question:
        pass

    message = r"^Question has no `prompt`; pass prompt= \(a string or a function of the question\)$"
    with pytest.raises(ValueError, match=message):
        _prompt_of(Question(), None)
    assert _prompt_of(Question(), "given") == "given"
    assert _prompt_of(SimpleNamespace(prompt="own", task="t"), lambda q: q.task) == "t"
