"""`linvid scenes`: pixel tokens, the cuts it finds in a video with known scenes, the contact
sheet it draws, and its text and JSON output."""

import json

import pytest
import torch

from linvid.cli import main
from linvid.video.contact_sheet import draw_contact_sheet, find_scene_cuts, pixel_tokens
from linvid.video.io import write_video
from linvid.video.scenes import adjacent_frame_similarity

COLORS = [(220, 30, 30), (30, 200, 40), (30, 40, 220)]  # three scenes
SCENE_SECONDS, FPS = 2, 8


@pytest.fixture(scope="module")
def three_scenes(tmp_path_factory):
    """6 s at 8 fps: red, green, blue scenes of 2 s, a white square moving within each."""
    per_scene = SCENE_SECONDS * FPS
    frames = torch.cat(
        [
            torch.tensor(color, dtype=torch.uint8).view(1, 3, 1, 1).expand(per_scene, 3, 48, 64)
            for color in COLORS
        ]
    ).clone()
    for index in range(len(frames)):
        x = 2 * (index % per_scene)
        frames[index, :, 10:20, x : x + 10] = 255
    path = tmp_path_factory.mktemp("scenes") / "three_scenes.mp4"
    write_video(path, frames, FPS)
    return str(path)


def test_pixel_tokens_are_grid_cells_centred_on_mid_grey():
    black, white = torch.zeros(1, 3, 32, 48, dtype=torch.uint8), torch.full((1, 3, 32, 48), 255)
    tokens = pixel_tokens(torch.cat([black, white.to(torch.uint8)]), grid=4)
    assert tokens.shape == (2, 16, 3) and tokens.dtype == torch.float32
    assert torch.allclose(tokens[0], torch.full((16, 3), -1.0))
    assert torch.allclose(tokens[1], torch.full((16, 3), 1.0))
    red, green = (
        torch.tensor(color, dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 8, 8)
        for color in COLORS[:2]
    )
    assert adjacent_frame_similarity(pixel_tokens(torch.cat([red, green])))[0] < 0
    with pytest.raises(ValueError, match="uint8"):
        pixel_tokens(torch.zeros(2, 3, 8, 8))


def test_finds_the_two_cuts_between_three_scenes(three_scenes):
    cuts = find_scene_cuts(three_scenes, fps=2)
    assert len(cuts.timestamps) == 12
    assert cuts.boundaries == [3, 7]
    assert cuts.cut_times == pytest.approx([2.0, 4.0])
    assert [scene["start"] for scene in cuts.scenes()] == pytest.approx([0.0, 2.0, 4.0])
    assert cuts.scenes()[-1]["end"] == pytest.approx(6.0)
    assert cuts.scene_ids() == [0] * 4 + [1] * 4 + [2] * 4
    assert all(cuts.similarity[cut] < cuts.tau for cut in cuts.boundaries)


def test_max_scenes_keeps_the_least_similar_cuts(three_scenes):
    cuts = find_scene_cuts(three_scenes, fps=2, max_scenes=2)
    all_cuts = find_scene_cuts(three_scenes, fps=2)
    least_similar = min(all_cuts.boundaries, key=lambda cut: all_cuts.similarity[cut])
    assert cuts.boundaries == [least_similar]


def test_scenes_command_writes_a_contact_sheet_and_prints_the_cuts(three_scenes, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert main(["scenes", three_scenes, "--out", str(out), "--fps", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "cuts (2): 2.00 s, 4.00 s" in printed
    assert "scene 2: 4.00 s - 6.00 s (4 sampled frames)" in printed


def test_scenes_command_json(three_scenes, capsys):
    assert main(["scenes", three_scenes, "--fps", "2", "--tau", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [cut["time"] for cut in report["cuts"]] == pytest.approx([2.0, 4.0])
    assert [cut["after_frame"] for cut in report["cuts"]] == [3, 7]
    assert len(report["scenes"]) == 3 and report["tau"] == 0.5
    assert len(report["similarity"]) == report["frames"] - 1 == 11
    assert report["contact_sheet"] is None


def test_contact_sheet_of_a_single_frame(three_scenes, tmp_path):
    cuts = find_scene_cuts(three_scenes, fps=0.1)
    assert len(cuts.timestamps) == 1 and cuts.boundaries == []
    out = draw_contact_sheet(cuts, tmp_path / "one.png", thumb_size=32)
    assert (tmp_path / "one.png").stat().st_size > 0 and out.endswith("one.png")


def test_scenes_command_reports_a_bad_video_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing.mp4")
    assert main(["scenes", missing]) == 2
    error = capsys.readouterr().err
    assert f"video file not found: {missing}" in error and "Traceback" not in error
