"""The shared breaker and the adaptive attempt timeouts, on an injected clock."""

from __future__ import annotations

import pytest

from server.delivery.throttle import (
    FAILING_SECONDS,
    THRESHOLD,
    THROTTLED_CAP,
    THROTTLED_SECONDS,
    Breakers,
)
from server.delivery.timeouts import AttemptTimeouts

KEY = ("EAAB-token", "123456789012345")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttling_opens_at_once_and_only_one_probe_goes_when_it_ends():
    clock = Clock()
    breakers = Breakers(clock=clock, rand=lambda: 0.0)
    breakers.failed(KEY, throttled=True)
    assert not breakers.allow(KEY)
    assert breakers.open_until(KEY) == clock.now + THROTTLED_SECONDS
    clock.now += THROTTLED_SECONDS
    assert breakers.allow(KEY)  # the probe
    assert not breakers.allow(KEY)  # the others wait for its outcome
    breakers.succeeded(KEY)
    assert breakers.allow(KEY) and breakers.allow(KEY)
    assert breakers.allow(("other-token", KEY[1]))  # per token and pixel


def test_other_failures_open_it_after_a_few_in_a_row():
    breakers = Breakers(clock=Clock(), rand=lambda: 0.0)
    for _ in range(THRESHOLD - 1):
        breakers.failed(KEY, throttled=False)
        assert breakers.allow(KEY)
    breakers.failed(KEY, throttled=False)
    assert not breakers.allow(KEY)


def test_intervals_double_with_each_failed_probe_up_to_the_cap_with_bounded_jitter():
    clock = Clock()
    breakers = Breakers(clock=clock, rand=lambda: 1.0)
    intervals = []
    for _ in range(12):
        breakers.failed(KEY, throttled=True)
        intervals.append(breakers.open_until(KEY) - clock.now)
        clock.now = breakers.open_until(KEY)
        assert breakers.allow(KEY)
    assert intervals[:3] == [pytest.approx(THROTTLED_SECONDS * 1.25 * 2**n) for n in range(3)]
    assert max(intervals) == pytest.approx(THROTTLED_CAP * 1.25)
    assert min(intervals) >= THROTTLED_SECONDS >= FAILING_SECONDS


def test_an_abandoned_probe_lets_another_go():
    clock = Clock()
    breakers = Breakers(clock=clock, rand=lambda: 0.0)
    breakers.failed(KEY, throttled=True)
    clock.now += THROTTLED_SECONDS
    assert breakers.allow(KEY)
    breakers.abandoned(KEY)
    assert breakers.allow(KEY)


def test_timeouts_double_after_a_timeout_and_come_back_down():
    timeouts = AttemptTimeouts(1.5, ceiling=60)
    assert timeouts.current() == 1.5
    timeouts.timed_out(1.5)
    assert timeouts.current() == 3.0
    timeouts.timed_out(3.0)
    assert timeouts.current() == 6.0
    timeouts.answered(2.0)  # one quick answer does not undo what the timeouts showed
    assert timeouts.current() > 5.0
    for _ in range(64):  # quick answers make the slow ones fade
        timeouts.answered(0.2)
    assert timeouts.current() == 1.5  # never below the floor
    for _ in range(10):
        timeouts.timed_out(timeouts.current())
    assert timeouts.current() == 60  # never above the ceiling


def test_failures_of_requests_sent_before_it_opened_do_not_lengthen_it():
    """Sixty-three requests out together that all time out open the breaker once, not
    sixty-three doublings deep."""
    clock = Clock()
    breakers = Breakers(clock=clock, rand=lambda: 0.0)
    for _ in range(63):
        breakers.failed(KEY, throttled=False)
    assert breakers.open_until(KEY) == clock.now + FAILING_SECONDS
    clock.now += FAILING_SECONDS
    assert breakers.allow(KEY)  # the probe fails: now it doubles
    breakers.failed(KEY, throttled=False)
    assert breakers.open_until(KEY) == clock.now + 2 * FAILING_SECONDS
