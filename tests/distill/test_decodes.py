"""The teacher-decode store: answers survive a reopen, several ranks' files merge, and a line
cut short by a kill is ignored."""

from linvid.distill.decodes import TeacherDecodes, decodes_key


def test_answers_survive_reopen_and_merge_across_ranks(tmp_path):
    first = TeacherDecodes(tmp_path, rank=0)
    second = TeacherDecodes(tmp_path, rank=1)
    first[3] = [5, 6, 2]
    second[4] = [7]
    assert 3 in first and 4 not in first and first[3] == [5, 6, 2]
    with open(tmp_path / "rank-1.jsonl", "a") as file:
        file.write('{"index": 9, "tokens": [1, 2')  # killed mid-line
    reopened = TeacherDecodes(tmp_path, rank=0)
    assert len(reopened) == 2 and reopened[4] == [7] and 9 not in reopened
    reopened[9] = [8]  # decoded again after the kill; the new line is whole
    assert TeacherDecodes(tmp_path, rank=1)[9] == [8]


def test_key_changes_with_any_setting():
    base = decodes_key(teacher="/t", data=["/a.jsonl"], sampling=[4, None])
    assert base == decodes_key(sampling=[4, None], data=["/a.jsonl"], teacher="/t")
    assert base != decodes_key(teacher="/t", data=["/a.jsonl"], sampling=[8, None])
