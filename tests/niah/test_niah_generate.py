import re

import numpy as np
import pytest

from linvid.niah.generate import (
    COLOURS,
    COUNTS,
    NEEDLE_SPAN,
    NUM_OPTIONS,
    TASKS,
    make_sample,
    minimum_frames,
    prompt_text,
    vocabulary,
)


def colour_fraction(frames: np.ndarray, colour: str, tolerance: float = 60.0) -> np.ndarray:
    """Per frame, the fraction of pixels within `tolerance` (RGB distance) of a needle colour."""
    distance = np.linalg.norm(frames.astype(np.float32) - np.float32(COLOURS[colour]), axis=-1)
    return (distance < tolerance).mean(axis=(1, 2))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("num_frames", [16, 256])
def test_sample_shapes_answer_and_needles(task, num_frames):
    for seed in range(6 if num_frames == 16 else 2):
        sample = make_sample(task, num_frames, seed)
        assert sample.frames.shape == (num_frames, 56, 56, 3)
        assert sample.frames.dtype == np.uint8
        assert len(sample.options) == NUM_OPTIONS == len(set(sample.options))
        assert sample.answer == sample.options[sample.answer_index]
        assert 0 <= sample.depth < 1
        assert sample.depth == sample.needle_frames[0] / num_frames
        assert list(sample.needle_frames) == sorted(set(sample.needle_frames))
        assert all(0 <= f < num_frames for f in sample.needle_frames)
        # Each needle event's colour covers a large part of its frames and nothing elsewhere.
        for start, colour in zip(sample.events, sample.needle_colours, strict=True):
            shown = colour_fraction(sample.frames, colour)
            assert (shown[start : start + NEEDLE_SPAN] > 0.3).all()
        for colour in COLOURS:
            away = np.setdiff1d(np.arange(num_frames), sample.needle_frames)
            assert colour_fraction(sample.frames[away], colour).max() == 0.0


def test_answers_match_the_needles():
    for seed in range(10):
        retrieval = make_sample("retrieval", 32, seed)
        assert retrieval.answer == retrieval.needle_colours[0]
        assert retrieval.shape in retrieval.question
        assert all(option in COLOURS for option in retrieval.options)
        ordering = make_sample("ordering", 32, seed)
        assert ordering.answer == " ".join(ordering.needle_colours)
        assert len(set(ordering.needle_colours)) == 3
        assert all(sorted(o.split()) == sorted(ordering.needle_colours) for o in ordering.options)
        counting = make_sample("counting", 32, seed)
        assert counting.answer == str(len(counting.events))
        assert sorted(counting.options) == [str(c) for c in COUNTS]
        assert len(counting.needle_frames) == NEEDLE_SPAN * int(counting.answer)


def test_events_are_separated_by_haystack():
    for seed in range(30):
        sample = make_sample("counting", 16, seed)
        gaps = np.diff(sample.events)
        assert (gaps >= 2 * NEEDLE_SPAN).all()
        assert all(start % NEEDLE_SPAN == 0 for start in sample.events)


def test_deterministic_and_seed_dependent():
    first, again = make_sample("ordering", 64, 7), make_sample("ordering", 64, 7)
    assert np.array_equal(first.frames, again.frames)
    assert (first.options, first.answer_index, first.needle_frames) == (
        again.options,
        again.answer_index,
        again.needle_frames,
    )
    other = make_sample("ordering", 64, 8)
    assert not np.array_equal(first.frames, other.frames)


def test_depths_cover_the_video_and_answers_are_balanced():
    depths = [make_sample("retrieval", 16, seed).depth for seed in range(200)]
    counts, _ = np.histogram(depths, bins=4, range=(0, 1))
    assert counts.min() > 25  # ~50 expected per quarter
    positions = [make_sample("counting", 16, seed).answer_index for seed in range(200)]
    assert np.bincount(positions, minlength=4).min() > 25


def test_both_retrieval_modes_occur():
    # "insert" replaces whole frames: a flat grey background around the needle.
    flat = []
    for seed in range(20):
        sample = make_sample("retrieval", 16, seed)
        frame = sample.frames[sample.events[0]].reshape(-1, 3)
        flat.append(len(np.unique(frame, axis=0)) == 2)
        assert flat[-1] == (sample.style == "insert")
    assert any(flat) and not all(flat)


def test_size_option():
    sample = make_sample("counting", 16, 0, size=28)
    assert sample.frames.shape == (16, 28, 28, 3)


def test_prompt_and_vocabulary():
    words = set(vocabulary())
    for task in TASKS:
        for seed in range(20):
            sample = make_sample(task, 16, seed)
            text = prompt_text(sample)
            assert text.startswith(sample.question + "\nOptions: " + ", ".join(sample.options))
            assert text.endswith("Answer the question using a single word or phrase.")
            assert set(re.findall(r"\w+|[^\w\s]", text)) <= words
            assert set(sample.answer.split()) <= words


def test_bad_input():
    with pytest.raises(ValueError, match="task must be one of"):
        make_sample("sorting", 16, 0)
    with pytest.raises(ValueError, match="num_frames must be an integer >= 14"):
        make_sample("counting", 12, 0)
    assert minimum_frames("retrieval") == NEEDLE_SPAN
    with pytest.raises(ValueError, match="seed"):
        make_sample("retrieval", 16, -1)
    with pytest.raises(ValueError, match="size must be even"):
        make_sample("retrieval", 16, 0, size=57)
