"""The ops benchmark's report: its structure and that its numbers agree with each other (not
its speed, which a test on a shared machine cannot judge)."""

import json

import pytest

from linvid.bench import ops as bench_ops
from linvid.cli import main


@pytest.fixture(scope="module")
def report():
    return bench_ops.run(lengths=(48, 96), repeats=1, modes=("forward", "forward+backward"))


def test_every_length_mode_and_implementation_is_measured(report):
    rows = report["rows"]
    timed = [row for row in rows if row["mode"] != "step"]
    assert len(timed) == 2 * 2 * 2 * 3  # ops x lengths x modes x (anchor, recurrent, chunk)
    for op in ("wkv6", "ssd"):
        steps = [row for row in rows if row["op"] == op and row["mode"] == "step"]
        assert len(steps) == 1 and steps[0]["milliseconds"] > 0
    assert all(row["milliseconds"] > 0 for row in rows)


def test_speedups_are_ratios_to_the_anchor_of_the_same_group(report):
    groups = {}
    for row in report["rows"]:
        if row["mode"] != "step":
            groups.setdefault((row["op"], row["tokens"], row["mode"]), []).append(row)
    for rows in groups.values():
        anchor = rows[0]
        assert "anchor" in anchor["implementation"]
        assert anchor["speedup_vs_anchor"] == pytest.approx(1.0)
        for row in rows:
            expected = anchor["milliseconds"] / row["milliseconds"]
            assert row["speedup_vs_anchor"] == pytest.approx(expected)


def test_gflops_and_peak_share_are_consistent(report):
    peak = report["machine"]["fp32_matmul_gflops"]
    assert peak > 0
    chunk_rows = [r for r in report["rows"] if r["implementation"] in ("wkv6_chunk", "ssd_chunk")]
    forward = [r for r in chunk_rows if r["mode"] == "forward"]
    assert forward and all(r["gflops"] > 0 for r in forward)  # the chunked forms use matmuls
    for row in forward:
        assert row["share_of_matmul_peak"] == pytest.approx(row["gflops"] / peak, rel=1e-2)


def test_goals_and_table_name_the_longest_length(report):
    assert len(report["goals"]) == 2
    assert all("T=96" in line for line in report["goals"])
    table_lines = report["table"].splitlines()
    assert len(table_lines) == 2 + len(report["rows"])


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "ops.json"
    code = main(
        ["bench", "ops", "--lengths", "32", "--repeats", "1", "--forward-only", "--json", str(path)]
    )
    assert code == 0
    written = json.loads(path.read_text())
    assert {row["mode"] for row in written["rows"]} == {"forward", "step"}
    assert "wkv6_chunk" in capsys.readouterr().out


def test_cli_rejects_bad_lengths_with_one_line(capsys):
    assert main(["bench", "ops", "--lengths", "8k"]) == 2
    error = capsys.readouterr().err
    assert "--lengths must be comma-separated integers" in error and "Traceback" not in error
