"""The video-io benchmark's report on a tiny video: its structure, that its ratios agree with
its byte counts, and that the synthetic video is cached (not its memory figures, which a
test on a shared machine cannot judge)."""

import json

import pytest

from linvid.bench import video_io
from linvid.cli import main


def test_report_is_consistent_and_the_video_is_cached(tmp_path, capsys):
    out = tmp_path / "report.json"
    arguments = ["--duration", "4", "--size", "64x48", "--source-fps", "8"]
    work = ["--work-dir", str(tmp_path / "work")]
    assert main(["bench", "video-io", *arguments, *work, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| peak RSS / sampled frames |" in printed
    report = json.loads(out.read_text())
    video, load, ratios = report["video"], report["load"], report["ratios"]
    assert video["generated"] and video["total_frames"] == 32 and video["size"] == [48, 64]
    assert load["sampled_shape"] == [4, 3, 48, 64]  # fps=1 over 4 s
    assert load["sampled_bytes"] == 4 * 3 * 48 * 64
    assert load["whole_video_bytes"] == 32 * 3 * 48 * 64
    assert load["peak_rss_bytes"] >= load["baseline_rss_bytes"] > 0
    assert ratios["peak_rss_over_sampled"] == pytest.approx(
        load["peak_rss_bytes"] / load["sampled_bytes"]
    )
    assert ratios["sampled_over_whole_video"] == pytest.approx(4 / 32)

    again = video_io.run(duration=4, size=(64, 48), source_fps=8, work_dir=str(tmp_path / "work"))
    assert not again["video"]["generated"] and again["video"]["path"] == video["path"]


def test_size_must_be_width_x_height(capsys):
    assert main(["bench", "video-io", "--size", "720p"]) == 2
    assert "--size must be WIDTHxHEIGHT" in capsys.readouterr().err
