"""The communication schedules of Local SGD and CSER: values and parameter validation."""
from __future__ import annotations

import pytest

from horovod_nuq.schedules import GrowingIntervals, Periodic


def _authors_times(T: int, R: int) -> list[int]:
    """The communication steps of Spiridonoff et al.'s experiment code (Local-SGD-re,
    quadratic.ipynb, method 3): a = 2T/(R(R+1)), steps int(a r (r+1) / 2), r = 1..R."""
    a = 2 * T / (R * (R + 1))
    return [int(a * r * (r + 1) / 2) for r in range(1, R + 1)]


@pytest.mark.parametrize("T,R", [(1000, 20), (1000, 44), (100, 4), (37, 3), (12, 2), (5, 1)])
def test_times_match_the_papers_code(T, R):
    s = GrowingIntervals(total_steps=T, rounds=R)
    assert s.times(T) == _authors_times(T, R)
    assert s.times(T)[-1] == T  # the R-th and last average lands after step T
    assert len(s.times(T)) == R


def test_round_lengths_grow_linearly():
    s = GrowingIntervals(growth=3)
    times = s.times(200)
    assert times[:5] == [3, 9, 18, 30, 45]
    gaps = [b - a for a, b in zip([0, *times], times)]
    assert gaps == [3 * r for r in range(1, len(times) + 1)]


def test_communicates_exactly_at_the_times():
    s = GrowingIntervals(total_steps=500, rounds=9)
    times = set(s.times(2000))
    assert [t for t in range(2001) if s.communicates(t)] == sorted(times)
    assert {s.round_of(t) for t in times} == set(range(1, len(times) + 1))


def test_one_shot_averages_once_at_the_end():
    s = GrowingIntervals(total_steps=40, rounds=1)
    assert s.times(40) == [40]
    assert [t for t in range(1, 41) if s.communicates(t)] == [40]


def test_rounds_continue_past_total_steps():
    s = GrowingIntervals(total_steps=12, rounds=2)  # a = 4: 4, 12, then 24, 40
    assert s.times(40) == [4, 12, 24, 40]


def test_periodic():
    s = Periodic(3)
    assert s.times(10) == [3, 6, 9]
    assert [t for t in range(11) if s.communicates(t)] == [3, 6, 9]


@pytest.mark.parametrize("kwargs,match", [
    ({}, "give total_steps"),
    ({"rounds": 3}, "rounds .R. needs total_steps"),
    ({"total_steps": 0}, "total_steps must be a positive int"),
    ({"total_steps": 10.0}, "total_steps must be a positive int"),
    ({"total_steps": True}, "total_steps must be a positive int"),
    ({"total_steps": 10, "rounds": 0}, "rounds must be a positive int"),
    ({"total_steps": 10, "rounds": 5}, "too few for rounds=5.*>= R.R\\+1./2 = 15"),
    ({"total_steps": 1000, "rounds": 50}, "too few for rounds=50"),
    ({"growth": 0.5}, "growth must be >= 1"),
    ({"growth": float("inf")}, "finite number"),
    ({"growth": "2"}, "finite number"),
    ({"growth": 2, "total_steps": 10}, "not both"),
    ({"growth": 2, "rounds": 3}, "not both"),
])
def test_growing_intervals_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GrowingIntervals(**kwargs)


def test_smallest_valid_total_steps():
    s = GrowingIntervals(total_steps=10, rounds=4)  # a = 1: rounds of 1, 2, 3, 4 steps
    assert s.times(10) == [1, 3, 6, 10]


@pytest.mark.parametrize("period", [0, -2, 1.5, None, True])
def test_periodic_validation(period):
    with pytest.raises(ValueError, match="period must be a positive int"):
        Periodic(period)


def test_describe_names_the_parameters():
    assert GrowingIntervals(total_steps=30, rounds=4).describe() == "GrowingIntervals(total_steps=30, rounds=4)"
    assert GrowingIntervals(growth=2).describe() == "GrowingIntervals(growth=2)"
    assert Periodic(5).describe() == "Periodic(period=5)"
