"""See where a video's scenes cut: sample frames, compare adjacent frames, cut with
`scene_boundaries` (paper 000 §4.1 eq. 8-9), and draw a contact sheet (`linvid scenes`).

Inside a model the cut is made on the vision tower's frame tokens (T, N, D). This module has
no model: a frame's "tokens" are its pixels on a coarse grid (N = grid * grid cells, D = 3
RGB values scaled to [-1, 1]), so a user can see where cuts fall in a video and how the
threshold tau acts before running a model. Pixel cosine similarity is a proxy: it sees
changes of colour and layout, not of meaning.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linvid.video.io import load_video, probe_video
from linvid.video.scenes import adjacent_frame_similarity, scene_boundaries

LABEL_HEIGHT = 14  # pixels under each thumbnail for its time and scene id
BORDER = 3  # pixels of scene colour around each thumbnail
CUT_BORDER = 6  # a thumbnail that starts a new scene gets a thicker frame


def pixel_tokens(frames: torch.Tensor, grid: int = 16) -> torch.Tensor:
    """Frame "tokens" from pixels: (T, 3, H, W) uint8 -> (T, grid * grid, 3) float32.

    Each frame is area-averaged onto a grid x grid raster and its values mapped from
    [0, 255] to [-1, 1]: centring on mid-grey makes opposite colours point apart under
    cosine similarity (raw non-negative pixels would all look alike).
    """
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(
            f"frames must be a uint8 (T, 3, H, W) tensor, got shape {tuple(frames.shape)} "
            f"dtype {frames.dtype}"
        )
    cells = F.adaptive_avg_pool2d(frames.float(), grid)  # (T, 3, grid, grid)
    return (cells / 127.5 - 1.0).flatten(2).transpose(1, 2).contiguous()


@dataclass
class SceneCuts:
    """A video's sampled frames and where `scene_boundaries` cuts them.

    frames: (T, 3, H, W) uint8 (small, for the contact sheet); timestamps: T seconds;
    similarity: (T - 1,) cosine similarity of frame t with t + 1; boundaries: cuts t (a new
    scene starts at frame t + 1); duration: the video's length (s), which ends the last scene.
    """

    path: str
    frames: torch.Tensor
    timestamps: list[float]
    similarity: torch.Tensor
    boundaries: list[int]
    tau: float
    max_scenes: int
    fps: float
    duration: float

    @property
    def cut_times(self) -> list[float]:
        """Seconds at which each new scene starts (the time of its first sampled frame)."""
        return [self.timestamps[cut + 1] for cut in self.boundaries]

    def scenes(self) -> list[dict]:
        """One {"scene", "start", "end" (s), "first_frame", "last_frame"} per scene."""
        firsts = [0, *(cut + 1 for cut in self.boundaries)]
        lasts = [*self.boundaries, len(self.timestamps) - 1]
        ends = [*self.cut_times, self.duration]
        return [
            {
                "scene": number,
                "start": self.timestamps[first],
                "end": end,
                "first_frame": first,
                "last_frame": last,
            }
            for number, (first, last, end) in enumerate(zip(firsts, lasts, ends, strict=True))
        ]

    def scene_ids(self) -> list[int]:
        """Scene number of each sampled frame."""
        ids, scene = [], 0
        cuts = set(self.boundaries)
        for frame in range(len(self.timestamps)):
            ids.append(scene)
            scene += frame in cuts
        return ids

    def describe(self) -> str:
        """The cuts and scenes as lines of text."""
        times = ", ".join(f"{time:.2f} s" for time in self.cut_times) or "none"
        lines = [
            f"{self.path}: {len(self.timestamps)} frames sampled at {self.fps:.3g} fps, "
            f"tau {self.tau:g}, at most {self.max_scenes} scenes",
            f"cuts ({len(self.boundaries)}): {times}",
        ]
        for scene in self.scenes():
            frames = scene["last_frame"] - scene["first_frame"] + 1
            lines.append(
                f"  scene {scene['scene']}: {scene['start']:.2f} s - {scene['end']:.2f} s "
                f"({frames} sampled frames)"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Everything but the pixels, JSON-ready."""
        return {
            "video": self.path,
            "frames": len(self.timestamps),
            "fps": self.fps,
            "duration": self.duration,
            "tau": self.tau,
            "max_scenes": self.max_scenes,
            "cuts": [
                {"after_frame": cut, "time": time, "similarity": float(self.similarity[cut])}
                for cut, time in zip(self.boundaries, self.cut_times, strict=True)
            ],
            "scenes": self.scenes(),
            "timestamps": self.timestamps,
            "similarity": self.similarity.tolist(),
        }


def find_scene_cuts(
    path: str | os.PathLike,
    *,
    fps: float = 1.0,
    max_frames: int | None = 256,
    tau: float = 0.6,
    max_scenes: int = 16,
    grid: int = 16,
    thumb_size: int = 96,
    start: float | None = None,
    end: float | None = None,
) -> SceneCuts:
    """Sample a video at `fps` (at most `max_frames`, between start and end seconds), describe
    each frame by `pixel_tokens`, and cut it with `scene_boundaries(tokens, max_scenes, tau)`.
    Frames are decoded at about twice `thumb_size` on their long side: enough for thumbnails
    and for the grid x grid features, and cheap in memory for long videos."""
    height, width = probe_video(path)["size"]
    scale = min(1.0, 2 * thumb_size / max(height, width))
    max_pixels = max(4, math.ceil(height * scale) * math.ceil(width * scale))
    # linvid's time-based plan: frames at `fps` shrunk to thumbnails (Qwen's sampling would
    # enlarge them to at least 128 tokens' worth of pixels).
    frames, meta = load_video(
        path,
        sampling="timestamps",
        fps=fps,
        max_frames=max_frames,
        start=start,
        end=end,
        max_pixels=max_pixels,
    )
    tokens = pixel_tokens(frames, grid)
    return SceneCuts(
        path=os.fspath(path),
        frames=frames,
        timestamps=meta["timestamps"],
        similarity=adjacent_frame_similarity(tokens),
        boundaries=scene_boundaries(tokens, max_scenes=max_scenes, tau=tau),
        tau=tau,
        max_scenes=max_scenes,
        fps=meta["fps"],
        duration=meta["duration"] if end is None else min(end, meta["duration"]),
    )


def draw_contact_sheet(
    cuts: SceneCuts, out: str | os.PathLike, *, thumb_size: int = 96, columns: int | None = None
) -> str:
    """Write a PNG: the sampled frames as a grid of thumbnails (long side `thumb_size` px)
    framed in their scene's colour, each labelled with its time and scene, frames that open a
    scene framed thicker; below, the adjacent-frame similarity over time with the tau line
    and the cuts. Returns the path written."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    count = len(cuts.timestamps)
    columns = columns or max(1, min(16, math.ceil(math.sqrt(count * 1.5))))
    rows = math.ceil(count / columns)
    colors = _scene_colors(max(cuts.scene_ids()) + 1)
    sheet, label_positions = _mosaic(cuts, thumb_size, columns, rows, colors)
    dpi = 100
    sheet_height_inches = sheet.shape[0] / dpi
    width_inches = max(8.0, sheet.shape[1] / dpi)
    plot_height_inches = 2.6
    figure = Figure(figsize=(width_inches, sheet_height_inches + plot_height_inches + 0.8), dpi=dpi)
    grid_spec = figure.add_gridspec(
        2, 1, height_ratios=[sheet_height_inches, plot_height_inches], hspace=0.25
    )
    sheet_axes = figure.add_subplot(grid_spec[0])
    sheet_axes.imshow(sheet, interpolation="nearest")
    sheet_axes.set_axis_off()
    scene_ids = cuts.scene_ids()
    for frame, (x, y) in enumerate(label_positions):
        sheet_axes.text(
            x,
            y,
            f"{cuts.timestamps[frame]:.1f}s  S{scene_ids[frame]}",
            ha="center",
            va="center",
            fontsize=6.5,
        )
    name = os.path.basename(cuts.path)
    sheet_axes.set_title(
        f"{name}: {count} frames at {cuts.fps:.3g} fps, {len(cuts.boundaries) + 1} scenes "
        f"(tau {cuts.tau:g}, at most {cuts.max_scenes})",
        fontsize=10,
    )

    plot = figure.add_subplot(grid_spec[1])
    for scene in cuts.scenes():
        plot.axvspan(scene["start"], scene["end"], color=colors[scene["scene"]], alpha=0.15)
    # similarity[t] compares frames t and t + 1; it is drawn at frame t + 1, so a dip sits
    # on the cut, which is the time the new scene's first frame shows.
    plot.plot(cuts.timestamps[1:], cuts.similarity.tolist(), marker=".", color="black")
    for time in cuts.cut_times:
        plot.axvline(time, color="red", linewidth=1.2)
    plot.axhline(cuts.tau, color="black", linestyle="--", linewidth=1)
    plot.set_xlim(cuts.scenes()[0]["start"], cuts.duration)
    plot.set_xlabel("time (s)")
    plot.set_ylabel("cosine similarity\nwith previous frame")
    plot.legend(
        handles=[
            Line2D([], [], color="black", marker=".", label="adjacent-frame similarity"),
            Line2D([], [], color="black", linestyle="--", label=f"tau = {cuts.tau:g}"),
            Line2D([], [], color="red", label="cut"),
        ],
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=3,
        frameon=False,
        fontsize=8,
    )
    figure.savefig(out, dpi=dpi, bbox_inches="tight")
    return os.fspath(out)


def _scene_colors(count: int) -> list[tuple[float, float, float]]:
    import matplotlib

    tab10 = matplotlib.colormaps["tab10"].colors
    palette = [tab10[index] for index in (0, 1, 2, 4, 5, 6, 8, 9)]  # no red (cuts), no grey
    return [palette[scene % len(palette)] for scene in range(count)]


def _mosaic(cuts: SceneCuts, thumb_size: int, columns: int, rows: int, colors):
    """The thumbnails in one (rows * cell_h, columns * cell_w, 3) uint8 image, and each
    frame's label centre (x, y) in its pixels."""
    frames = cuts.frames
    height, width = frames.shape[-2:]
    scale = thumb_size / max(height, width)
    thumb_h, thumb_w = max(1, round(height * scale)), max(1, round(width * scale))
    thumbs = F.interpolate(frames.float(), size=(thumb_h, thumb_w), mode="area")
    thumbs = thumbs.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    cell_h, cell_w = thumb_h + 2 * CUT_BORDER + LABEL_HEIGHT, thumb_w + 2 * CUT_BORDER
    sheet = torch.full((rows * cell_h, columns * cell_w, 3), 255, dtype=torch.uint8)
    starts = {0, *(cut + 1 for cut in cuts.boundaries)}
    positions = []
    for frame, (thumb, scene) in enumerate(zip(thumbs, cuts.scene_ids(), strict=True)):
        top, left = (frame // columns) * cell_h, (frame % columns) * cell_w
        border = CUT_BORDER if frame in starts else BORDER
        inset = CUT_BORDER - border
        color = torch.tensor([round(255 * channel) for channel in colors[scene]], dtype=torch.uint8)
        frame_top, frame_left = top + inset, left + inset
        sheet[
            frame_top : frame_top + thumb_h + 2 * border,
            frame_left : frame_left + thumb_w + 2 * border,
        ] = color
        sheet[
            top + CUT_BORDER : top + CUT_BORDER + thumb_h,
            left + CUT_BORDER : left + CUT_BORDER + thumb_w,
        ] = thumb
        positions.append((left + cell_w / 2, top + 2 * CUT_BORDER + thumb_h + LABEL_HEIGHT / 2))
    return sheet.numpy(), positions
