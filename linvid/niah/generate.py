"""Needle-in-a-video-haystack samples in VNBench's three tasks (paper 000 §5.1 / A.3,
VideoNIAH): retrieval, ordering and counting, procedurally generated in numpy.

Haystack: smooth low-saturation colour noise that drifts over time, a moving brightness
gradient, faint moving stripes and a moving grey/white/black distractor shape. None of it is
saturated, so it never looks like a needle.
Needles: one of six saturated colours x four shapes, each covering about half of the frame,
shown for `NEEDLE_SPAN` consecutive frames (an event starts on a multiple of the span, so with
Qwen2.5-VL's temporal patch of 2 an event is exactly one temporal token). Consecutive events
are separated by at least one span of haystack. A retrieval needle is either drawn over the
haystack ("edit") or shown on a flat grey frame that replaces the haystack ("insert").

- retrieval: one needle; "What colour was the <shape> in the video?"; options: 4 colour words.
- ordering: three needles of distinct colours at increasing times; "In what order did the
  colours appear?"; options: 4 orderings of those colours, e.g. "red blue green".
- counting: one needle (colour, shape) shown k times, k in 1..4; "How many times did the
  <colour> <shape> appear?"; options: "1" "2" "3" "4".

Answers are the option's content (a from-scratch teacher learns that; letters it does not,
see DEMO_TEACHER.md). Options come in a seeded order; everything is a function of
(task, num_frames, seed, size). The first needle's time is uniform over the times that leave
room for the task's events, so every depth is covered at every length.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

import numpy as np

TASKS = ("retrieval", "ordering", "counting")
# A haystack shows one frame per second: `niah generate` writes its videos at this rate, and
# in-memory samples are fed to models with the second_per_grid_ts of this rate, so a model
# sees the same temporal positions whether it reads the frames or the written video.
FRAMES_PER_SECOND = 1.0
COLOURS = {
    "red": (235, 20, 20),
    "green": (20, 220, 20),
    "blue": (25, 25, 240),
    "yellow": (240, 230, 20),
    "cyan": (20, 225, 235),
    "magenta": (230, 20, 230),
}
SHAPES = ("square", "circle", "triangle", "cross")
COUNTS = (1, 2, 3, 4)
NUM_OPTIONS = 4
ORDERING_NEEDLES = 3
NEEDLE_SPAN = 2  # frames per needle event
QUESTIONS = {
    "retrieval": "What colour was the {shape} in the video?",
    "ordering": "In what order did the colours appear?",
    "counting": "How many times did the {colour} {shape} appear?",
}
OPTIONS_PREFIX = "Options: "
ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
MAX_CHROMA = 24  # haystack: largest per-channel departure from grey


@dataclass(frozen=True, eq=False)
class NeedleSample:
    """One needle video and its multiple-choice question.

    frames: (T, H, W, 3) uint8 RGB. options: NUM_OPTIONS distinct content texts (colour
    words, colour sequences, counts). needle_frames: every frame showing a needle, sorted.
    depth: first needle frame / T. needle_colours: the colour of each needle event in time
    order (ordering: three colours; counting: the counted colour k times). shape: the
    retrieval/counting needle's shape ("" for ordering, whose shapes vary). events: the first
    frame of each needle event. style: "insert" for a retrieval needle shown on whole frames
    of its own, else "edit"."""

    task: str
    frames: np.ndarray
    question: str
    options: tuple[str, ...]
    answer_index: int
    needle_frames: tuple[int, ...]
    depth: float
    needle_colours: tuple[str, ...] = ()
    shape: str = ""
    events: tuple[int, ...] = ()  # first frame of each needle event
    style: str = "edit"  # "edit": drawn over the haystack; "insert": replaces whole frames

    @property
    def answer(self) -> str:
        return self.options[self.answer_index]

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]


def minimum_frames(task: str) -> int:
    """The fewest frames a task's sample fits in (its events plus the gaps between them)."""
    _check_task(task)
    events = {"retrieval": 1, "ordering": ORDERING_NEEDLES, "counting": max(COUNTS)}[task]
    return (2 * events - 1) * NEEDLE_SPAN


def make_sample(task: str, num_frames: int, seed: int, *, size: int = 56) -> NeedleSample:
    """A sample of `task` with `num_frames` frames of size x size; deterministic in
    (task, num_frames, seed, size)."""
    _check_task(task)
    for name, value, low in (
        ("num_frames", num_frames, minimum_frames(task)),
        ("size", size, 16),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low} for task {task!r}, got {value!r}")
    if size % 2:
        raise ValueError(f"size must be even (video encoders need even sides), got {size}")
    num_frames, size, seed = int(num_frames), int(size), int(seed)
    rng = np.random.default_rng((seed, TASKS.index(task), num_frames, size))
    frames = _haystack(rng, num_frames, size)
    colour_names = list(COLOURS)
    if task == "retrieval":
        colour = colour_names[rng.integers(len(colour_names))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        events = _event_starts(rng, num_frames, 1)
        colours, shapes = [colour], [shape]
        distractors = [c for c in colour_names if c != colour]
        wrong = [distractors[i] for i in rng.choice(len(distractors), NUM_OPTIONS - 1, False)]
        correct, question = colour, QUESTIONS[task].format(shape=shape)
    elif task == "ordering":
        picked = rng.choice(len(colour_names), ORDERING_NEEDLES, replace=False)
        colours = [colour_names[i] for i in picked]
        shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=ORDERING_NEEDLES)]
        events = _event_starts(rng, num_frames, ORDERING_NEEDLES)
        orders = [" ".join(p) for p in itertools.permutations(colours)]
        correct, others = orders[0], orders[1:]
        wrong = [others[i] for i in rng.choice(len(others), NUM_OPTIONS - 1, replace=False)]
        shape, question = "", QUESTIONS[task]
    else:
        colour = colour_names[rng.integers(len(colour_names))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        count = int(COUNTS[rng.integers(len(COUNTS))])
        events = _event_starts(rng, num_frames, count)
        colours, shapes = [colour] * count, [shape] * count
        correct = str(count)
        wrong = [str(c) for c in COUNTS if c != count]
        question = QUESTIONS[task].format(colour=colour, shape=shape)
    insert = task == "retrieval" and bool(rng.integers(2))
    needle_frames = []
    for start, colour, shape_name in zip(events, colours, shapes, strict=True):
        mask = _shifted_mask(rng, shape_name, size)
        span = slice(start, start + NEEDLE_SPAN)
        if insert:  # whole frames replace the haystack: flat grey with the needle on it
            frames[span] = rng.integers(60, 190)
        frames[span, mask] = COLOURS[colour]
        needle_frames.extend(range(start, start + NEEDLE_SPAN))
    options = [correct, *wrong]
    order = rng.permutation(NUM_OPTIONS)
    options = tuple(options[i] for i in order)
    return NeedleSample(
        task=task,
        frames=frames,
        question=question,
        options=options,
        answer_index=int(np.flatnonzero(order == 0)[0]),
        needle_frames=tuple(needle_frames),
        depth=events[0] / num_frames,
        needle_colours=tuple(colours),
        shape=shape,
        events=tuple(events),
        style="insert" if insert else "edit",
    )


def prompt_text(sample: NeedleSample) -> str:
    """The question, the options line and paper 000's open-ended instruction, one per line."""
    return prompt_for(sample.question, sample.options)


def prompt_for(question: str, options) -> str:
    """`prompt_text` of a question and its options in this order (e.g. read from a written
    data set's vnbench.jsonl)."""
    return "\n".join((question, OPTIONS_PREFIX + ", ".join(options), ANSWER_INSTRUCTION))


@functools.cache
def vocabulary() -> list[str]:
    """Every word and punctuation mark any question, option, answer or prompt can contain
    (split on white space and punctuation, as linvid.models.tokenizer does), sorted."""
    texts = [OPTIONS_PREFIX, ANSWER_INSTRUCTION, ",", *COLOURS, *SHAPES, *map(str, COUNTS)]
    texts += [QUESTIONS[task] for task in TASKS]
    words = set()
    for text in texts:
        words.update(re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w+\}", " ", text)))
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# Drawing


def _check_task(task) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")


def _event_starts(rng, num_frames: int, count: int) -> list[int]:
    """First frames of `count` needle events on the grid of NEEDLE_SPAN-frame slots, at least
    one empty slot apart; the first slot is uniform over those leaving room for the rest."""
    slots = num_frames // NEEDLE_SPAN
    needed = 2 * count - 1
    first = int(rng.integers(slots - needed + 1))
    # The other events: spread the spare slots after `first` over the count gaps + the tail.
    spare = slots - first - needed
    cuts = np.sort(rng.integers(spare + 1, size=count - 1)) if count > 1 else np.zeros(0, int)
    extra = np.diff(np.concatenate(([0], cuts)))  # extra empty slots before events 2..count
    starts, slot = [first], first
    for gap in extra:
        slot += 2 + int(gap)
        starts.append(slot)
    return [s * NEEDLE_SPAN for s in starts]


def _haystack(rng, num_frames: int, size: int) -> np.ndarray:
    """(T, size, size, 3) uint8: smooth drifting colour noise, a moving gradient, moving
    stripes and a moving distractor, all grey-ish (chroma at most MAX_CHROMA per channel).
    Built channels-first in float32 (long inner loops), transposed once at the end."""
    t = np.arange(num_frames, dtype=np.float32)
    grid, keyframe_every = 5, 8
    keys = num_frames // keyframe_every + 2
    luma_keys = rng.uniform(60, 190, size=(keys, 1, grid, grid)).astype(np.float32)
    chroma_keys = rng.uniform(-MAX_CHROMA, MAX_CHROMA, size=(keys, 3, grid, grid))
    field_keys = np.concatenate((luma_keys, chroma_keys.astype(np.float32)), axis=1)
    position = t / keyframe_every
    low = position.astype(np.int64)
    weight = (position - low)[:, None, None, None]
    field = field_keys[low] * (1 - weight) + field_keys[low + 1] * weight  # (T, 4, g, g)
    up = _upsampler(grid, size)  # (size, grid)
    # Matmuls, not einsum: the same values, several times faster (the teacher trains on
    # fresh samples).
    field = up @ field @ up.T  # (T, 4, size, size): luma, then 3 chroma offsets
    luma, chroma = field[:, 0], field[:, 1:]
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi) + t * rng.uniform(-0.2, 0.2)
    strength = rng.uniform(10, 30)
    luma += (strength * np.cos(angle))[:, None, None] * axis[None, None, :]
    luma += (strength * np.sin(angle))[:, None, None] * axis[None, :, None]
    # Stripes sin(f * phase(y, x) + speed * t), expanded so that only (size, size) needs trig.
    stripe_angle = rng.uniform(0, np.pi)
    phase = np.cos(stripe_angle) * axis[None, :] + np.sin(stripe_angle) * axis[:, None]
    frequency, speed = rng.uniform(4, 10), rng.uniform(-0.6, 0.6)
    amplitude = rng.uniform(0, 12)
    wave = frequency * np.pi * phase
    luma += (amplitude * np.cos(speed * t))[:, None, None] * np.sin(wave)
    luma += (amplitude * np.sin(speed * t))[:, None, None] * np.cos(wave)
    # The distractor: a grey-level square or disk of radius ~size/8 bouncing around.
    radius = size / 8
    centre = rng.uniform(radius, size - radius, size=2)
    velocity = rng.uniform(-2.0, 2.0, size=2) * size / 56
    span = size - 2 * radius
    path = np.abs((centre - radius + velocity * t[:, None]) % (2 * span) - span)
    path = (span - path + radius).astype(np.float32)  # reflected into [radius, size - radius]
    pixels = np.arange(size, dtype=np.float32)
    dy = np.abs(pixels[None, :, None] - path[:, 0, None, None])
    dx = np.abs(pixels[None, None, :] - path[:, 1, None, None])
    disc = dx**2 + dy**2 <= radius**2 if rng.integers(2) else np.maximum(dx, dy) <= radius
    luma[disc] = rng.choice((20.0, 128.0, 235.0))
    chroma *= ~disc[:, None]
    chroma += luma[:, None]
    np.clip(chroma, 0, 255, out=chroma)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    np.copyto(frames, chroma.transpose(0, 2, 3, 1), casting="unsafe")
    return frames


@functools.cache
def _upsampler(grid: int, size: int) -> np.ndarray:
    """(size, grid) linear interpolation weights from a grid x grid field to size x size."""
    position = np.linspace(0, grid - 1, size)
    low = np.minimum(position.astype(np.int64), grid - 2)
    weight = position - low
    matrix = np.zeros((size, grid), np.float32)
    matrix[np.arange(size), low] = 1 - weight
    matrix[np.arange(size), low + 1] = weight
    return matrix


@functools.cache
def _shape_mask(shape: str, size: int) -> np.ndarray:
    """A centred boolean mask of `shape` covering about half of a size x size frame."""
    axis = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    y, x = axis[:, None], axis[None, :]
    if shape == "square":
        mask = np.maximum(np.abs(x), np.abs(y)) <= 0.71
    elif shape == "circle":
        mask = x**2 + y**2 <= 0.8**2
    elif shape == "triangle":  # apex up, base at the bottom
        mask = (y <= 0.85) & (np.abs(x) <= (y + 0.95) * 0.55)
    elif shape == "cross":
        mask = ((np.abs(x) <= 0.33) | (np.abs(y) <= 0.33)) & (np.maximum(abs(x), abs(y)) <= 0.9)
    else:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")
    mask.setflags(write=False)
    return mask


def _shifted_mask(rng, shape: str, size: int) -> np.ndarray:
    """The shape's mask moved by a random offset that keeps it inside the frame."""
    mask = _shape_mask(shape, size)
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    dy = int(rng.integers(-rows[0], size - rows[-1]))
    dx = int(rng.integers(-columns[0], size - columns[-1]))
    return np.roll(mask, (dy, dx), axis=(0, 1))
