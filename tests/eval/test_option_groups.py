"""Option scoring for a TransV student (`linvid.eval.options.evaluate`): rows go through the
model in groups sharing their video grid and prompt length, because TransV takes one prompt
length per forward (the tokens from there on are the answer: no transfer into them, and the
attention-guided drop reads the last prompt token, paper 002 eq. 5-6). Questions whose prompts
differ in length, scored in one call, must score as each does alone, and every forward must
see rows of one prompt length and one grid."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.demo.students import InferenceSettings, StudentView
from linvid.distill.data import IGNORE_INDEX
from linvid.eval.options import AnswerEncoder, evaluate, option_scores
from linvid.models.qwen_video import video_token_count
from linvid.models.transv import apply_transv, has_transv
from linvid.niah import generate
from linvid.niah.teacher import build_tokenizer, teacher_config

# The demo's TransV student (TimeViper, paper 002) reads videos this way.
SETTINGS = InferenceSettings(tokens_per_frame=2, transv=True)
# (task, frames, seed, widened): at 16 frames, ordering's prompt (its options are colour
# sequences) is longer than retrieval's and counting's, which share a length and so one forward.
# A 32-frame video and a 16-frame one twice as wide have as many video tokens (so the same
# prompt length) on different grids.
QUESTIONS = [
    ("retrieval", 16, 1, False),
    ("ordering", 16, 2, False),
    ("counting", 16, 3, False),
    ("retrieval", 16, 4, False),
    ("retrieval", 32, 5, False),
    ("retrieval", 16, 6, True),
]


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
def student(tokenizer):
    """The demo teacher's architecture converted to its TransV student (mamba2-hybrid-25 with
    paper 002's schedule), TransV gates open so dropped tokens visibly change the scores."""
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(teacher_config(tokenizer)).eval()
    model = linvid.convert(teacher, "mamba2-hybrid-25")
    apply_transv(model, "paper", init="transfer")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".transv." in name and name.endswith("alpha"):
                parameter.fill_(1.0)
    return model.eval()


def question(task, frames, seed, widened):
    sample = generate.make_sample(task, frames, seed)
    if not widened:
        return sample
    # The frames side by side with their mirror image: 56 x 112.
    wide = np.concatenate([sample.frames, sample.frames[:, :, ::-1]], axis=2)
    return dataclasses.replace(sample, frames=wide)


@pytest.fixture(scope="module")
def questions():
    return [question(*entry) for entry in QUESTIONS]


class Recorder:
    """A `prepare` that records, for every forward, each row's video grid and prompt length (its
    first labelled position) as `options` hands them over, and changes nothing."""

    def __init__(self):
        self.forwards = []

    def __call__(self, model, batch):
        labelled = batch["labels"] != IGNORE_INDEX
        starts = [int(row.nonzero()[0]) for row in labelled]
        grids = [tuple(grid.tolist()) for grid in batch["video_grid_thw"]]
        self.forwards.append(list(zip(grids, starts, strict=True)))
        return batch


def prompt_groups(questions, tokenizer, config):
    """(video grid, prompt length) -> number of option rows, computed from the chat template
    and the video's token count directly."""
    encoder = AnswerEncoder(tokenizer, config)
    groups = Counter()
    for question in questions:
        grid = encoder.video(question.frames)["video_grid_thw"].reshape(3)
        count = video_token_count(grid, config.vision_config.spatial_merge_size)
        length = len(encoder.prompt_ids(generate.prompt_text(question), count))
        groups[tuple(grid.tolist()), length] += len(question.options)
    return groups


def test_transv_scores_in_one_call_equal_each_question_alone(student, tokenizer, questions):
    """evaluate with all questions in one call (batch_questions = 6): every option's score
    equals option_scores of its question alone (full precision; evaluate's records keep 4
    decimals, hence the 1e-4 tolerance), and every choice is that score's argmax."""
    assert has_transv(student)
    together = evaluate(
        student,
        tokenizer,
        questions,
        prompt=generate.prompt_text,
        prepare=StudentView(SETTINGS),
        batch_questions=len(questions),
    )["records"]
    view = StudentView(SETTINGS)
    for question, record in zip(questions, together, strict=True):
        alone = option_scores(
            student, tokenizer, question, prompt=generate.prompt_text, prepare=view
        )
        torch.testing.assert_close(
            torch.tensor(record["scores"]), alone, atol=1e-4, rtol=0, check_dtype=False
        )
        assert record["choice"] == int(alone.argmax())
    # TransV shapes these scores: without the view (no ToMe, no TransV prompt length) they
    # differ, so the comparison above sees what TransV does with each prompt length.
    plain = option_scores(student, tokenizer, questions[1], prompt=generate.prompt_text)
    assert not torch.allclose(plain, torch.tensor(together[1]["scores"]), atol=1e-2)


def test_every_forward_holds_one_prompt_length_and_one_grid(student, tokenizer, questions):
    """The rows of one evaluate call reach the model as exactly the groups computed here from
    the prompts' token counts: one forward per (grid, prompt length), holding every option row
    that shares it (questions of two tasks together), never rows of two prompt lengths."""
    expected = prompt_groups(questions, tokenizer, student.config)
    # Questions of one grid whose prompts differ in length, and of one prompt length on
    # different grids: each half of the key is needed to tell them apart.
    assert max(Counter(grid for grid, _ in expected).values()) >= 2
    assert max(Counter(length for _, length in expected).values()) >= 2
    # No StudentView here: its own one-prompt-length check is not what this test relies on.
    recorder = Recorder()
    evaluate(
        student,
        tokenizer,
        questions,
        prompt=generate.prompt_text,
        prepare=recorder,
        batch_questions=len(questions),
    )
    for rows in recorder.forwards:
        assert len(set(rows)) == 1, f"one forward mixed rows of {sorted(set(rows))}"
    seen = Counter({rows[0]: len(rows) for rows in recorder.forwards})
    assert len(recorder.forwards) == len(expected)
    assert seen == expected
