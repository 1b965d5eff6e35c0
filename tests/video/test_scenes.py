"""Scene boundaries and scene tokens (paper 000 §4.1 eq. 8-10) against the definition
restated with Python loops, plus synthetic videos with known cuts."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from linvid.video.scenes import adjacent_frame_similarity, scene_boundaries, scene_tokens

fast = settings(max_examples=40, deadline=None)


def loop_similarity(frames):
    flat = [frame.flatten().double() for frame in frames]
    return [
        float(flat[t] @ flat[t + 1] / (flat[t].norm() * flat[t + 1].norm()))
        for t in range(len(flat) - 1)
    ]


def loop_boundaries(frames, max_scenes, tau):
    similarity = loop_similarity(frames)
    candidates = [t for t in range(len(similarity)) if similarity[t] < tau]
    least_similar = sorted(candidates, key=lambda t: (similarity[t], t))[: max_scenes - 1]
    return sorted(least_similar)


def loop_scene_tokens(frames, boundaries):
    edges = [-1, *boundaries, frames.shape[0] - 1]
    scenes = []
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        total = sum(frames[t] for t in range(start + 1, end + 1))
        scenes.append(total / (end - start))
    return torch.stack(scenes)


@st.composite
def videos(draw):
    """Frames sharing a common component with per-frame noise of random strength, so that
    adjacent similarities spread over roughly (0, 1)."""
    frame_count = draw(st.integers(1, 24))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    common = torch.randn(shape, generator=generator)
    noise_scale = 2 * torch.rand(frame_count, 1, 1, generator=generator)
    return common + noise_scale * torch.randn(frame_count, *shape, generator=generator)


@fast
@given(videos())
def test_similarity_matches_definition(frames):
    similarity = adjacent_frame_similarity(frames)
    assert similarity.shape == (frames.shape[0] - 1,)
    assert similarity.dtype == torch.float32
    torch.testing.assert_close(
        similarity, torch.tensor(loop_similarity(frames), dtype=torch.float32)
    )


@fast
@given(videos(), st.integers(1, 30), st.floats(-0.2, 1.0))
def test_boundaries_match_definition(frames, max_scenes, tau):
    similarity = loop_similarity(frames)
    # Keep clear of float32-vs-float64 rounding at the threshold and between candidates.
    assume(all(abs(value - tau) > 1e-5 for value in similarity))
    assume(all(abs(a - b) > 1e-5 for a in similarity for b in similarity if a is not b))
    boundaries = scene_boundaries(frames, max_scenes=max_scenes, tau=tau)
    assert boundaries == loop_boundaries(frames, max_scenes, tau)
    assert len(boundaries) <= max_scenes - 1
    assert all(type(cut) is int for cut in boundaries)


@fast
@given(videos(), st.floats(-0.2, 1.0), st.floats(-0.2, 1.0))
def test_raising_tau_only_adds_cuts_when_uncapped(frames, low, high):
    low, high = sorted((low, high))
    uncapped = frames.shape[0]
    cuts_low = scene_boundaries(frames, max_scenes=uncapped, tau=low)
    cuts_high = scene_boundaries(frames, max_scenes=uncapped, tau=high)
    assert set(cuts_low) <= set(cuts_high)


def synthetic_video(scene_lengths, tokens=6, channels=8, noise=0.05, seed=0):
    """Each scene repeats its own random frame with small noise; scenes are unrelated."""
    generator = torch.Generator().manual_seed(seed)
    frames = [
        torch.randn(tokens, channels, generator=generator).expand(length, -1, -1)
        for length in scene_lengths
    ]
    video = torch.cat(frames)
    return video + noise * torch.randn(video.shape, generator=generator)


def test_clear_cuts_are_found():
    frames = synthetic_video([4, 3, 5, 1, 2])
    assert scene_boundaries(frames) == [3, 6, 11, 12]
    similarity = adjacent_frame_similarity(frames)
    within_scene = [t for t in range(len(similarity)) if t not in (3, 6, 11, 12)]
    assert (similarity[within_scene] > 0.9).all()


def test_max_scenes_keeps_the_sharpest_cuts():
    frames = synthetic_video([3, 3, 3, 3])
    # Make the cut after frame 5 gentle (a candidate, but the least sharp of the three).
    frames[6:9] = 0.3 * frames[5] + 0.7 * frames[6:9]
    similarity = adjacent_frame_similarity(frames)
    assert max(similarity[2], similarity[8]) < similarity[5] < 0.6
    assert scene_boundaries(frames, max_scenes=4) == [2, 5, 8]
    assert scene_boundaries(frames, max_scenes=3) == [2, 8]
    assert scene_boundaries(frames, max_scenes=1) == []
    assert scene_boundaries(frames, max_scenes=16, tau=-1.5) == []


def test_tau_above_one_cuts_everywhere_and_tau_below_minus_one_nowhere():
    frames = synthetic_video([2, 2, 2])
    assert scene_boundaries(frames, max_scenes=100, tau=1.5) == list(range(5))
    assert scene_boundaries(frames, max_scenes=100, tau=-1.5) == []


def test_ties_keep_the_earlier_cut():
    frames = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    assert scene_boundaries(frames, max_scenes=3, tau=0.5) == [0, 1]


def test_similarity_equal_to_tau_is_not_a_cut():
    frames = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]])  # similarities 0 and 1
    assert scene_boundaries(frames, tau=0.0) == []
    assert scene_boundaries(frames, tau=1e-6) == [0]


def test_single_frame_has_no_cut():
    frames = torch.randn(1, 3, 4)
    assert adjacent_frame_similarity(frames).shape == (0,)
    assert scene_boundaries(frames) == []
    torch.testing.assert_close(scene_tokens(frames, []), frames)


@fast
@given(videos(), st.data())
def test_scene_tokens_are_scene_means(frames, data):
    cut_range = range(frames.shape[0] - 1)
    boundaries = sorted(data.draw(st.sets(st.sampled_from(cut_range))) if cut_range else [])
    tokens = scene_tokens(frames, boundaries)
    assert tokens.shape == (len(boundaries) + 1, *frames.shape[1:])
    torch.testing.assert_close(tokens, loop_scene_tokens(frames, boundaries))


def test_scene_tokens_of_synthetic_video():
    frames = synthetic_video([4, 3, 5], noise=0.0)
    tokens = scene_tokens(frames, scene_boundaries(frames))
    torch.testing.assert_close(tokens, frames[[0, 4, 7]])
    half = scene_tokens(frames.to(torch.bfloat16), [3, 6])
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), frames[[0, 4, 7]], atol=2e-2, rtol=2e-2)


def test_scene_tokens_accept_tensor_boundaries():
    frames = torch.randn(6, 2, 3)
    torch.testing.assert_close(
        scene_tokens(frames, torch.tensor([1, 4])), scene_tokens(frames, [1, 4])
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: scene_boundaries(torch.zeros(0, 3, 4)), r"frames must hold at least one frame"),
        (lambda: adjacent_frame_similarity(torch.zeros(0, 3, 4)), r"got shape \(0, 3, 4\)"),
        (lambda: scene_boundaries(torch.randn(5, 4)), r"frames must have 3 dimensions \(T, N, D\)"),
        (lambda: scene_boundaries(torch.randn(5, 2, 2), max_scenes=0), r"max_scenes .* got 0"),
        (
            lambda: scene_boundaries(torch.randn(5, 2, 2), tau=math.nan),
            r"tau must be a finite real",
        ),
        (
            lambda: scene_boundaries(torch.randn(5, 2, 2), tau=math.inf),
            r"tau must be a finite real",
        ),
        (
            lambda: scene_boundaries(torch.randn(5, 2, 2), tau="0.6"),
            r"tau must be a finite real.*'0.6'",
        ),
        (lambda: scene_tokens(torch.randn(5, 2, 2), [4]), r"\[0, T - 2\] = \[0, 3\].*got \[4\]"),
        (lambda: scene_tokens(torch.randn(5, 2, 2), [-1]), r"got \[-1\]"),
        (lambda: scene_tokens(torch.randn(5, 2, 2), [2, 1]), r"strictly increasing.*got \[2, 1\]"),
        (lambda: scene_tokens(torch.randn(5, 2, 2), [1, 1]), r"strictly increasing.*got \[1, 1\]"),
        (lambda: scene_tokens(torch.randn(5, 2, 2), [1.5]), r"ints .*got \[1.5\]"),
        (lambda: scene_tokens(torch.zeros(0, 2, 2), []), r"frames must hold at least one frame"),
    ],
)
def test_invalid_inputs_are_explained(call, message):
    with pytest.raises(ValueError, match=message):
        call()
