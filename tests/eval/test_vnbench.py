"""VNBench's format and VideoNIAH's circular scoring (linvid.eval.vnbench), on hand-computed
cases: 4 tries per question, right only if all 4 are right, Overall the mean over types."""

import json
import math

import pytest

from linvid.eval.lmms_tasks import generated_choice, process_choice, vnbench_documents
from linvid.eval.vnbench import (
    answer_index,
    circular_scores,
    expand_tries,
    letter_prompt,
    parse_letter,
    question_key,
    read_annotations,
)


def result(key, kind, attempt, correct, depth=None):
    return {"key": key, "type": kind, "try": attempt, "correct": correct, "depth": depth}


def test_a_question_counts_only_when_all_four_tries_are_right():
    results = [result("q1", "ret_insert1", k, True, 0.1) for k in range(4)]  # right
    results += [result("q2", "ret_insert1", k, k != 3, 0.6) for k in range(4)]  # one wrong
    results += [result("q3", "cnt_edit1", k, True, 0.9) for k in range(4)]  # right
    results += [result("q4", "cnt_edit1", k, True) for k in range(3)]  # a try missing
    scores = circular_scores(results)
    assert scores["by_type"] == {"cnt_edit1": 0.5, "ret_insert1": 0.5}
    assert scores["by_task"] == {"counting": 0.5, "retrieval": 0.5}
    assert scores["overall"] == 0.5 and scores["all"] == 0.5
    assert scores["incomplete"] == 1 and scores["questions"] == 4
    assert scores["single_try"] == 1.0  # try 0 right for every question
    # first needle at depth 0.1 -> quarter 1, 0.6 -> 3, 0.9 -> 4; q4 has no position
    assert scores["by_position"] == {1: 1.0, 3: 0.0, 4: 1.0}


def test_overall_is_the_mean_over_types_not_over_questions():
    """VideoNIAH averages the per-type accuracies: 3 right of 3 in one type and 0 of 1 in
    another is 50%, where the share of questions is 75%."""
    results = [result(f"a{i}", "ord_edit1", k, True) for i in range(3) for k in range(4)]
    results += [result("b", "ret_edit2", k, False) for k in range(4)]
    scores = circular_scores(results)
    assert scores["overall"] == 0.5
    assert scores["all"] == 0.75
    assert math.isnan(circular_scores([])["overall"])


def test_a_try_given_twice_is_an_error():
    with pytest.raises(ValueError, match="try 1 twice"):
        circular_scores([result("q", "t", 1, True), result("q", "t", 1, False)])


def test_expanded_tries_rotate_the_options_and_follow_the_right_one():
    record = {"video": "v.mp4", "question": "Which?", "options": ["a", "b", "c", "d"], "gt": "c"}
    tries = expand_tries([record])
    assert [entry["try"] for entry in tries] == [0, 1, 2, 3]
    assert [entry["options"] for entry in tries] == [
        ["a", "b", "c", "d"],
        ["b", "c", "d", "a"],
        ["c", "d", "a", "b"],
        ["d", "a", "b", "c"],
    ]
    assert [answer_index(entry) for entry in tries] == [2, 1, 0, 3]
    assert len({question_key(entry) for entry in tries}) == 1
    # records that carry their try (VNBench's own files) are kept as they are
    assert expand_tries(tries) == tries


@pytest.mark.parametrize(
    "text, letter",
    [("B", "B"), ("B. red", "B"), ("The answer is C", "C"), ("A and D", "A"), ("red.", None)],
)
def test_letters_are_read_as_videoniah_reads_them(text, letter):
    assert parse_letter(text) == letter


def test_gt_as_text_letter_or_index_and_clear_errors(tmp_path):
    record = {"video": "v.mp4", "question": "q", "options": ["w", "x", "y", "z"]}
    assert [answer_index({**record, "gt": gt}) for gt in ("y", "C", 2)] == [2, 2, 2]
    with pytest.raises(ValueError, match="gt 'q' is none of the options"):
        answer_index({**record, "gt": "q"})
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"video": "v.mp4", "question": "q", "options": ["a"], "gt": "a"}))
    with pytest.raises(ValueError, match="options must be a list of 4"):
        read_annotations(path)
    path.write_text(json.dumps({"question": "q"}))
    with pytest.raises(ValueError, match="missing video"):
        read_annotations(path)


def test_vnbench_documents_score_generated_letters_and_option_losses(tmp_path):
    """A VNBench file (JSON list, 4 tries, gt as text) becomes lmms-eval documents with
    VideoNIAH's lettered prompt; letters and losses pick options as VideoNIAH and lmms-eval
    do."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "v.mp4").write_bytes(b"")
    options = ["red", "green", "blue", "pink"]
    records = [
        {
            "video": "v.mp4",
            "question": "What colour?",
            "options": options[k:] + options[:k],
            "gt": "blue",
            "type": "ret_insert1",
            "try": k,
            "question_id": f"v_ret_insert1_{k}",
        }
        for k in range(4)
    ]
    annotation = tmp_path / "anno.json"
    annotation.write_text(json.dumps(records))
    documents = vnbench_documents(annotation, tmp_path / "videos")
    assert [doc["answer_index"] for doc in documents] == [2, 1, 0, 3]
    assert {doc["key"] for doc in documents} == {"v_ret_insert1"}
    assert documents[0]["prompt"] == letter_prompt(records[0])
    assert documents[0]["prompt"].splitlines()[1:3] == ["A. red", "B. green"]
    assert generated_choice(documents[0], "C. blue") == 2
    assert generated_choice(documents[1], "blue") is None  # no letter in it
    picked = process_choice(documents[0], ["(3.0, False)", "(2.5, False)", (0.5, False), 0.7])
    assert picked["circular"]["choice"] == 2 and picked["circular"]["correct"]
    with pytest.raises(ValueError, match="video 'w.mp4' is not in"):
        annotation.write_text(json.dumps([{**records[0], "video": "w.mp4"}]))
        vnbench_documents(annotation, tmp_path / "videos")
