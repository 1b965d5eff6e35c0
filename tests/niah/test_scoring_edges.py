"""Edges of linvid/niah/scoring.py that the mutation run (docs/mutation.md) found unguarded:
the messages of its input checks, one bin, the default of four depth bins, and the order of
the accuracy tables (tasks alphabetical, "overall" last; cells by depth bin, then frames)."""

import pytest

from linvid.niah.generate import make_sample
from linvid.niah.scoring import (
    accuracy_by_depth_and_frames,
    accuracy_by_task,
    circular_correct,
    depth_bin,
    rotate_options,
)


def test_a_shift_that_is_not_an_integer_is_refused_by_name():
    sample = make_sample("retrieval", 16, 0)
    for shift in (1.5, "1", None, True):
        with pytest.raises(ValueError, match=r"shift must be an integer, got "):
            rotate_options(sample, shift)


def test_a_choice_outside_the_options_names_the_valid_range():
    sample = make_sample("counting", 16, 0)  # four options: 0..3
    for choice in (-1, 4):
        with pytest.raises(ValueError, match=rf"choose returned {choice}, outside 0\.\.3 options"):
            circular_correct(lambda rotated, choice=choice: choice, sample)


def test_one_bin_holds_every_depth():
    assert [depth_bin(depth, bins=1) for depth in (0.0, 0.5, 0.999)] == [0, 0, 0]
    assert [depth_bin(depth, bins=2) for depth in (0.0, 0.49, 0.5, 0.999)] == [0, 0, 1, 1]


def test_no_samples_is_refused_with_its_message():
    with pytest.raises(ValueError, match=r"^no samples to score$"):
        accuracy_by_depth_and_frames([], [])


def test_depth_cells_use_four_bins_by_default():
    """A needle at depth 0.85 is in bin 3 of 4 (it would be bin 4 of 5, bin 1 of 2)."""
    records = [
        {"type": "retrieval", "depth": 0.85, "num_frames": 16},
        {"type": "retrieval", "depth": 0.1, "num_frames": 16},
    ]
    assert accuracy_by_depth_and_frames(records, [True, False]) == {(0, 16): 0.0, (3, 16): 1.0}


def test_tasks_come_in_alphabetical_order_with_overall_last():
    """The report tables list tasks alphabetically and the overall accuracy last, whatever
    the order of the samples (here "overall" would sort between the tasks, and the samples
    start with the last task)."""
    tasks = ["retrieval", "counting", "retrieval", "ordering", "counting"]
    records = [{"type": task, "depth": 0.5, "num_frames": 16} for task in tasks]
    accuracy = accuracy_by_task(records, [True, False, False, True, True])
    assert list(accuracy) == ["counting", "ordering", "retrieval", "overall"]
    assert accuracy == {"counting": 0.5, "ordering": 1.0, "retrieval": 0.5, "overall": 0.6}


def test_depth_cells_come_sorted_by_bin_then_frames():
    cells = [(0.9, 64), (0.1, 64), (0.9, 16), (0.3, 16), (0.1, 16)]
    records = [{"type": "retrieval", "depth": d, "num_frames": n} for d, n in cells]
    accuracy = accuracy_by_depth_and_frames(records, [True, False, True, True, False], bins=2)
    assert list(accuracy) == [(0, 16), (0, 64), (1, 16), (1, 64)]
    assert accuracy == {(0, 16): 0.5, (0, 64): 0.0, (1, 16): 1.0, (1, 64): 1.0}
