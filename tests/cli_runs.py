"""Helpers for tests that run the `linvid` command as a user does (a subprocess) and check
that earlier output was left byte for byte as it was."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*arguments, cwd=REPO, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """`python -m linvid.cli ARGUMENTS...` in a subprocess (stdout and stderr as text)."""
    return subprocess.run(
        [sys.executable, "-m", "linvid.cli", *map(str, arguments)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def file_hashes(*directories) -> dict[str, str]:
    """{path: sha256} of every file below the directories (hidden ones too); paths relative
    to the directory, prefixed by its name when several are given."""
    hashes = {}
    for directory in map(Path, directories):
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                key = path.relative_to(directory).as_posix()
                if len(directories) > 1:
                    key = f"{directory.name}/{key}"
                hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def default_ctrl_c() -> None:
    """Popen's preexec_fn for a child that is to be interrupted: SIGINT back to its default
    disposition, so that Python in the child raises KeyboardInterrupt even when the test
    runner was started with SIGINT ignored (as `cmd &` in a non-interactive shell does)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_when(command, ready, logs: Path, cwd=None, timeout: float = 90.0):
    """Start `command` in its own session, wait until `ready()`, then send SIGINT to its
    process group (what a terminal's Ctrl-C does). Returns (exit code, stdout, stderr)."""
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=default_ctrl_c,
        )
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if process.poll() is not None:
                    pytest.fail(
                        f"exited {process.returncode} before it could be interrupted:\n"
                        + stderr.read_text()[-3000:]
                    )
                if time.monotonic() > deadline:
                    pytest.fail(f"not ready after {timeout} s:\n" + stderr.read_text()[-3000:])
                time.sleep(0.02)
            os.killpg(process.pid, signal.SIGINT)
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return code, stdout.read_text(), stderr.read_text()
