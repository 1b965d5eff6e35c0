"""The output rule every linvid command that writes follows (README, "Outputs"):

1. outputs appear complete or not at all: a file is written to a temporary name beside it and
   renamed into place; a directory is built as `.NAME.partial-*` beside it and renamed into
   place when it is whole;
2. an existing non-empty output is never replaced without `--overwrite`, and never the input
   itself (nor a directory that holds the input or lies inside it);
3. an interrupted run leaves the previous output intact (the partial directory is removed,
   or kept under its `.partial` name where it holds finished work a rerun resumes from).

Plain functions on paths: nothing here knows about models.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_MARK = ".partial-"


class OutputExistsError(ValueError):
    """An output that exists and would be replaced (or an output that is an input). The
    message names the path and the option that allows replacing it."""


def _resolved(path) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def check_output(
    out,
    *,
    overwrite: bool = False,
    inputs: Iterable = (),
    option: str = "--out",
) -> Path:
    """Refuse an output path that is an input (or contains / lies inside one) and, unless
    `overwrite`, one that exists and is not empty. Returns the absolute path.

    out: the file or directory to write; inputs: paths the command reads; option: the
    argument's name, for the message."""
    target = _resolved(out)
    for source in inputs:
        if source is None:
            continue
        source = _resolved(source)
        if target == source or source in target.parents or target in source.parents:
            raise OutputExistsError(
                f"{option} {out} would overwrite the input {source}; choose another {option}"
            )
    if overwrite or not target.exists():
        return target
    if target.is_dir() and not any(target.iterdir()):
        return target
    raise OutputExistsError(
        f"{option} {out} exists and is not empty; pass --overwrite to replace it, or choose "
        f"another {option}"
    )


def replace_path(new, out) -> None:
    """Move `new` (a finished file or directory beside `out`) to `out`, replacing what is
    there. The old output is renamed aside first and removed only once the new one is in
    place, so a failure in between leaves one of the two whole."""
    new, out = Path(new), Path(out)
    if not out.exists() and not out.is_symlink():
        os.replace(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old = aside / out.name
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_directory(
    out,
    *,
    overwrite: bool = False,
    inputs: Iterable = (),
    option: str = "--out",
    keep_partial: bool = False,
) -> Iterator[Path]:
    """Build a directory output whole or not at all: yields `.NAME.partial-XXXX` beside `out`
    (checked with `check_output` first); when the block ends normally it replaces `out`. On
    an error or interrupt `out` is left as it was and the partial directory is removed
    (kept, with its name, when `keep_partial`)."""
    target = check_output(out, overwrite=overwrite, inputs=inputs, option=option)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL_MARK}", dir=target.parent))
    try:
        yield work
    except BaseException:
        if not keep_partial:
            shutil.rmtree(work, ignore_errors=True)
        raise
    # mkdtemp makes the directory private (0700); the finished output gets the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)
    replace_path(work, target)


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary path)` beside `path`, then rename the file into place (removed on
    failure). Returns `path`."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
