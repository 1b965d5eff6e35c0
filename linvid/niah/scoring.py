"""Scoring needle questions as VNBench does: circular evaluation (a question counts as right
only if the model picks the right option under each of the 4 rotations of its options), and
accuracy by task and by (needle depth, number of frames). Pure: the model's side is a
`choose(sample) -> option index` callable (e.g. the option whose text it scores highest)."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

from linvid.niah.generate import NeedleSample


def rotate_options(sample: NeedleSample, shift: int) -> NeedleSample:
    """The sample with its options rotated left by `shift` (option i moves to position
    i - shift mod n) and answer_index following the right option; shift 0 is the sample."""
    if isinstance(shift, bool) or not isinstance(shift, int):
        raise ValueError(f"shift must be an integer, got {shift!r}")
    count = len(sample.options)
    shift %= count
    options = sample.options[shift:] + sample.options[:shift]
    return dataclasses.replace(
        sample, options=options, answer_index=(sample.answer_index - shift) % count
    )


def circular_correct(choose: Callable[[NeedleSample], int], sample: NeedleSample) -> bool:
    """True if `choose` picks the right option under every rotation of the options (stops at
    the first wrong pick). `choose` must return an option index."""
    for shift in range(len(sample.options)):
        rotated = rotate_options(sample, shift)
        choice = choose(rotated)
        if isinstance(choice, bool) or not isinstance(choice, int):
            raise ValueError(f"choose must return an option index (int), got {choice!r}")
        if not 0 <= choice < len(rotated.options):
            raise ValueError(
                f"choose returned {choice}, outside 0..{len(rotated.options) - 1} options"
            )
        if choice != rotated.answer_index:
            return False
    return True


def depth_bin(depth: float, bins: int = 4) -> int:
    """Which of `bins` equal bins of [0, 1) a needle depth falls in."""
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    if not (isinstance(depth, (int, float)) and 0 <= depth < 1):
        raise ValueError(f"depth must be a number in [0, 1), got {depth!r}")
    return min(bins - 1, math.floor(depth * bins))


def accuracy_by_task(samples: Iterable, correct: Iterable[bool]) -> dict[str, float]:
    """Accuracy per task plus "overall" (the mean over all samples). samples: NeedleSamples
    or vnbench.jsonl records (mappings with "type"); correct: one bool per sample."""
    return _accuracy(((_field(s, "task"), ok) for s, ok in _pairs(samples, correct)), "overall")


def accuracy_by_depth_and_frames(
    samples: Iterable, correct: Iterable[bool], *, bins: int = 4
) -> dict[tuple[int, int], float]:
    """Accuracy per (depth bin, number of frames): the cells of a needle-depth x length map.
    Depth bin b covers depths [b / bins, (b + 1) / bins)."""
    keyed = (
        ((depth_bin(_field(s, "depth"), bins), _field(s, "num_frames")), ok)
        for s, ok in _pairs(samples, correct)
    )
    return _accuracy(keyed, None)


def _pairs(samples: Iterable, correct: Iterable[bool]):
    samples, correct = list(samples), list(correct)
    if len(samples) != len(correct):
        raise ValueError(f"got {len(samples)} samples but {len(correct)} correctness values")
    if not samples:
        raise ValueError("no samples to score")
    return zip(samples, correct, strict=True)


def _accuracy(keyed: Iterable, overall_key) -> dict:
    totals: dict = defaultdict(lambda: [0, 0])
    for key, ok in keyed:
        for name in (key, overall_key) if overall_key is not None else (key,):
            totals[name][0] += bool(ok)
            totals[name][1] += 1
    return {key: right / total for key, (right, total) in sorted(totals.items(), key=_order)}


def _order(item):
    key = item[0]
    return (key == "overall", key)


def _field(sample, name: str):
    """A field of a NeedleSample, or of a vnbench.jsonl record (its task is under "type")."""
    if isinstance(sample, Mapping):
        key = "type" if name == "task" and "type" in sample else name
        if key not in sample:
            raise ValueError(f"record has no {key!r} field: {dict(sample)!r:.120}")
        return sample[key]
    return getattr(sample, name)


def circular_results(
    choose: Callable[[NeedleSample], int], samples: Sequence[NeedleSample]
) -> list[bool]:
    """circular_correct for each sample, in order."""
    return [circular_correct(choose, sample) for sample in samples]
