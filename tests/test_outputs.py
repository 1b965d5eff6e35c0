"""The output rule (linvid/outputs.py): complete or nothing, never over an input, never over
a non-empty output without overwrite, an interrupted run leaves the old output."""

import pytest

from linvid.outputs import (
    OutputExistsError,
    atomic_directory,
    atomic_write_text,
    check_output,
)


def test_an_input_is_never_an_output(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for out in (model, model / "student", tmp_path):
        with pytest.raises(OutputExistsError, match="would overwrite the input"):
            check_output(out, overwrite=True, inputs=[model], option="--out")


def test_non_empty_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    assert check_output(out) == out  # missing: fine
    out.mkdir()
    assert check_output(out) == out  # empty: fine
    (out / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output(out)
    assert check_output(out, overwrite=True) == out


def test_directory_appears_whole_and_replaces_the_old_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with atomic_directory(out, overwrite=True) as work:
        (work / "new").write_text("new")
        assert (out / "old").read_text() == "old"  # untouched until the end
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert [path.name for path in out.iterdir()] == ["new"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_directory_leaves_the_old_output(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(error), atomic_directory(out, overwrite=True) as work:
        (work / "new").write_text("new")
        raise error()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert (out / "old").read_text() == "old"


def test_atomic_text_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1
