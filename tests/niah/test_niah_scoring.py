import pytest

from linvid.niah.generate import make_sample
from linvid.niah.scoring import (
    accuracy_by_depth_and_frames,
    accuracy_by_task,
    circular_correct,
    circular_results,
    depth_bin,
    rotate_options,
)


def test_rotations_keep_the_answer_and_cover_every_position():
    sample = make_sample("ordering", 16, 3)
    positions = set()
    for shift in range(4):
        rotated = rotate_options(sample, shift)
        assert rotated.answer == sample.answer
        assert sorted(rotated.options) == sorted(sample.options)
        assert rotated.options[0] == sample.options[shift]
        positions.add(rotated.answer_index)
    assert positions == {0, 1, 2, 3}
    assert rotate_options(sample, 4).options == sample.options
    assert rotate_options(sample, -1).options == rotate_options(sample, 3).options
    assert rotate_options(sample, 1).frames is sample.frames


def test_circular_rule():
    sample = make_sample("retrieval", 16, 0)
    assert circular_correct(lambda s: s.answer_index, sample)
    # By content: right under every rotation.
    assert circular_correct(lambda s: s.options.index(sample.answer), sample)
    # A fixed position is right under exactly one rotation: wrong overall.
    assert not circular_correct(lambda s: 0, sample)
    # Right under three rotations only: still wrong.
    calls = []

    def right_but_last(s):
        calls.append(s)
        return s.answer_index if len(calls) < 4 else (s.answer_index + 1) % 4

    assert not circular_correct(right_but_last, sample)
    assert len(calls) == 4
    # A constant text choice ("always red") is right only when the answer is that text.
    by_text = [make_sample("retrieval", 16, seed) for seed in range(20)]
    results = circular_results(
        lambda s: s.options.index("red") if "red" in s.options else 0, by_text
    )
    assert results == [s.answer == "red" for s in by_text]


def test_choose_must_return_an_index():
    sample = make_sample("counting", 16, 0)
    with pytest.raises(ValueError, match="option index"):
        circular_correct(lambda s: "2", sample)
    with pytest.raises(ValueError, match="outside"):
        circular_correct(lambda s: 4, sample)


def test_accuracy_by_task_and_depth():
    samples = [
        make_sample(task, frames, seed)
        for task in ("retrieval", "counting")
        for frames in (16, 64)
        for seed in range(4)
    ]
    correct = [s.task == "retrieval" or s.num_frames == 16 for s in samples]
    by_task = accuracy_by_task(samples, correct)
    assert by_task == {"counting": 0.5, "retrieval": 1.0, "overall": 0.75}
    cells = accuracy_by_depth_and_frames(samples, correct, bins=2)
    for (bin_index, frames), value in cells.items():
        members = [
            ok
            for s, ok in zip(samples, correct, strict=True)
            if s.num_frames == frames and depth_bin(s.depth, 2) == bin_index
        ]
        assert value == sum(members) / len(members)
    assert {frames for _, frames in cells} == {16, 64}
    records = [{"type": s.task, "depth": s.depth, "num_frames": s.num_frames} for s in samples]
    assert accuracy_by_task(records, correct) == by_task
    assert accuracy_by_depth_and_frames(records, correct, bins=2) == cells


def test_depth_bins_and_bad_input():
    assert [depth_bin(d) for d in (0.0, 0.24, 0.25, 0.99)] == [0, 0, 1, 3]
    with pytest.raises(ValueError, match="depth"):
        depth_bin(1.0)
    with pytest.raises(ValueError, match="bins"):
        depth_bin(0.5, bins=0)
    with pytest.raises(ValueError, match="2 samples but 1"):
        accuracy_by_task([make_sample("retrieval", 16, 0)] * 2, [True])
    with pytest.raises(ValueError, match="no samples"):
        accuracy_by_task([], [])
    with pytest.raises(ValueError, match="'depth'"):
        accuracy_by_depth_and_frames([{"type": "retrieval"}], [True])
