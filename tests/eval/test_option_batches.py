"""How `evaluate` (linvid/eval/options.py) batches a call's rows, in the cases the mutation run
(docs/mutation.md) found unguarded: two prompts of different lengths whose options have the same
number of tokens must still go through separate forwards (a forward holds one prompt length:
TransV reads it, paper 002 eq. 5-6), a video shared by several questions goes through the
vision path once, and a float64 model scores as the float32 one."""

import copy
from types import SimpleNamespace

import pytest
import torch

from linvid.distill.data import IGNORE_INDEX
from linvid.eval.options import AnswerEncoder, evaluate
from linvid.niah import generate
from linvid.niah.teacher import build_teacher, build_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the model is tiny and the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return build_teacher(tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def questions():
    """Two questions on one video (the same frames object), prompts 3 and 5 words long, and
    options of one token each."""
    sample = generate.make_sample("retrieval", 16, 3)
    return [
        SimpleNamespace(
            frames=sample.frames,
            options=sample.options,
            answer_index=sample.answer_index,
            task="retrieval",
            prompt=prompt,
        )
        for prompt in ("what colour ?", "what colour was the shape ?")
    ]


def prompt_lengths(batch) -> set[int]:
    """The first labelled position of each row (rows are right-padded)."""
    return {int((row != IGNORE_INDEX).nonzero()[0]) for row in batch["labels"]}


def test_prompts_of_different_lengths_never_share_a_forward(tokenizer, teacher, questions):
    lengths = []

    def prepare(model, batch):
        lengths.append(prompt_lengths(batch))
        return batch

    for question in questions:
        assert all(
            len(tokenizer(o, add_special_tokens=False)["input_ids"]) == 1 for o in question.options
        )
    evaluate(teacher, tokenizer, questions, batch_questions=2, prepare=prepare)
    assert len(lengths) == 2 and all(len(forward) == 1 for forward in lengths)
    assert lengths[0] != lengths[1]


def test_a_shared_video_is_encoded_once_per_call(tokenizer, teacher, questions):
    encoder = AnswerEncoder(tokenizer, teacher.config)
    videos = []
    encode = encoder.video
    encoder.video = lambda frames: videos.append(frames) or encode(frames)
    evaluate(teacher, tokenizer, questions, batch_questions=2, encoder=encoder)
    assert len(videos) == 1 and videos[0] is questions[0].frames


def test_a_float64_model_scores_as_the_float32_one(tokenizer, teacher, questions):
    """A float64 copy of the model scores as the float32 one does (pixels, features and logits
    all follow the model's dtype; scores come back as float32 rounded to 4 decimals)."""
    single = evaluate(teacher, tokenizer, questions, batch_questions=2)
    double = evaluate(copy.deepcopy(teacher).double(), tokenizer, questions, batch_questions=2)
    for ours, theirs in zip(double["records"], single["records"], strict=True):
        assert ours["scores"] == pytest.approx(theirs["scores"], abs=2e-3)
