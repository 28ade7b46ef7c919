"""The deadline-based retry policy (kubetune_trainer.retry), on a fake clock."""

from __future__ import annotations

import pytest

from kubetune_trainer.retry import Backoff, RetriesExhausted, call_with_retries

pytestmark = pytest.mark.unit


class Transient(Exception):
    pass


class FakeTime:
    """A clock that moves only when slept on (plus an optional cost per call)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def _failing(times: int, fake: FakeTime, cost: float = 0.0, error: type = Transient):
    """A call that fails ``times`` times (each try taking ``cost`` seconds), then returns."""
    calls = []

    def call() -> str:
        calls.append(fake.now)
        fake.now += cost
        if len(calls) <= times:
            raise error(f"failure {len(calls)}")
        return "done"

    return call, calls


def test_succeeds_after_transient_failures_with_growing_jittered_waits() -> None:
    fake = FakeTime()
    call, calls = _failing(5, fake)
    backoff = Backoff(patience=60, first=0.5, cap=8)
    result = call_with_retries(
        call,
        transient=Transient,
        backoff=backoff,
        clock=fake.clock,
        sleep=fake.sleep,
        jitter=lambda: 0.0,
    )
    assert result == "done"
    assert len(calls) == 6
    assert fake.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0]  # (0.5 * 2**n) * 0.5 at jitter 0


def test_waits_are_capped_and_jitter_stays_in_its_band() -> None:
    backoff = Backoff(patience=60, first=0.5, cap=8)
    assert backoff.delay(10, 0.0) == 4.0
    assert backoff.delay(10, 0.999) == pytest.approx(8.0, abs=0.01)
    assert backoff.delay(10_000, 0.5) == 6.0  # no overflow for huge retry counts
    for retry in range(8):
        low, high = backoff.delay(retry, 0.0), backoff.delay(retry, 0.999999)
        assert low * 2 == pytest.approx(high, rel=1e-5)


def test_gives_up_when_the_patience_is_spent_and_says_how_long() -> None:
    fake = FakeTime()
    call, calls = _failing(10_000, fake, cost=1.0)  # each try takes a second
    retries: list[tuple[int, float, float]] = []
    with pytest.raises(RetriesExhausted) as raised:
        call_with_retries(
            call,
            transient=Transient,
            backoff=Backoff(patience=30, first=0.5, cap=8),
            on_retry=lambda error, tries, wait, elapsed: retries.append((tries, wait, elapsed)),
            clock=fake.clock,
            sleep=fake.sleep,
            jitter=lambda: 0.999999,
        )
    gave_up = raised.value
    assert isinstance(gave_up.last, Transient)
    assert gave_up.tries == len(calls)
    assert 30 <= gave_up.elapsed <= 31  # the deadline, plus at most the last try's cost
    assert calls[-1] - calls[0] <= 30  # no try starts after the deadline
    assert [tries for tries, _, _ in retries] == list(range(1, len(calls)))  # one per retry
    assert retries[-1][2] + retries[-1][1] <= 30  # the last wait ends at the deadline
    assert f"after {gave_up.tries} tries" in str(gave_up) and "failure" in str(gave_up)


def test_other_errors_pass_through_at_once() -> None:
    fake = FakeTime()
    call, calls = _failing(1, fake, error=KeyError)
    with pytest.raises(KeyError):
        call_with_retries(
            call, transient=Transient, backoff=Backoff(), clock=fake.clock, sleep=fake.sleep
        )
    assert len(calls) == 1 and fake.sleeps == []


def test_zero_patience_tries_once() -> None:
    fake = FakeTime()
    call, calls = _failing(1, fake)
    with pytest.raises(RetriesExhausted) as raised:
        call_with_retries(
            call,
            transient=Transient,
            backoff=Backoff(patience=0),
            clock=fake.clock,
            sleep=fake.sleep,
        )
    assert raised.value.tries == 1 and len(calls) == 1 and fake.sleeps == []
