"""`linvid bench memory`: its report's structure and consistency (not its numbers)."""

import json

from linvid.bench import memory as bench_memory
from linvid.cli import main


def test_memory_benchmark_reports_every_model_and_length(tmp_path, capsys):
    out = tmp_path / "memory.json"
    code = main(
        [
            "bench",
            "memory",
            "--frames",
            "4,8",
            "--work-dir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    rows = {(row["model"], row["frames"]): row for row in result["rows"]}
    assert set(rows) == {(model, frames) for model in ("teacher", "rwkv6-all") for frames in (4, 8)}
    assert rows[("rwkv6-all", 8)]["streamed"] and not rows[("teacher", 8)]["streamed"]
    # 2-frame temporal patches of 56x56: 4 LLM tokens per patch
    assert rows[("teacher", 8)]["video_tokens"] == 16 == rows[("rwkv6-all", 8)]["video_tokens"]
    for model in ("teacher", "rwkv6-all"):
        peaks = [rows[(model, frames)]["peak_rss_mib"] for frames in (4, 8)]
        assert all(peak > 50 for peak in peaks)
        assert abs(result["growth"][model] - peaks[1] / peaks[0]) < 1e-9
    printed = capsys.readouterr().out
    assert "rwkv6-all peak at 8 frames / at 4" in printed
    assert printed.count("\n| ") == 4  # one table row per measurement
    assert bench_memory.FRAME_SIZE == 56
