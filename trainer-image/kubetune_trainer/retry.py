"""Retry a call that fails transiently, with exponential backoff and jitter, until a deadline.

``call_with_retries(call, transient=..., backoff=...)`` calls ``call`` until it returns,
raises an error that is not ``transient`` (passed through at once), or the backoff's
patience is spent since the first try (then :class:`RetriesExhausted`, carrying the last
error, the number of tries and the seconds spent). The deadline is checked between
tries: a try already running is not cut short, so the total can exceed the patience by
at most one try's own timeout. The clock, sleep and jitter source are parameters, so the
policy is tested without waiting.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """How long to keep trying (``patience``, seconds) and how long to wait between tries.

    The n-th wait (n = 0, 1, …) is ``min(cap, first * 2**n)`` scaled by a random factor in
    [0.5, 1) ("equal jitter": clients that failed together do not retry together), and
    never beyond the deadline. ``patience=0`` means a single try.
    """

    patience: float = 60.0
    first: float = 0.5
    cap: float = 8.0

    def delay(self, retry: int, jitter: float) -> float:
        """The wait before retry number ``retry`` (0-based), for ``jitter`` in [0, 1)."""
        return min(self.cap, self.first * 2.0 ** min(retry, 62)) * (0.5 + jitter / 2)


class RetriesExhausted(Exception):
    """The call kept failing transiently until the patience was spent."""

    def __init__(self, last: BaseException, tries: int, elapsed: float) -> None:
        super().__init__(f"gave up after {tries} tries over {elapsed:.1f} s: {last}")
        self.last = last
        self.tries = tries
        self.elapsed = elapsed


def call_with_retries(
    call: Callable[[], T],
    *,
    transient: type[BaseException] | tuple[type[BaseException], ...],
    backoff: Backoff,
    on_retry: Callable[[BaseException, int, float, float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> T:
    """``call()``'s result, retrying ``transient`` errors until ``backoff.patience`` is spent.

    ``on_retry(error, tries so far, wait, seconds spent)`` is called before each wait.
    """
    started = clock()
    tries = 0
    while True:
        try:
            return call()
        except transient as error:
            tries += 1
            elapsed = clock() - started
            remaining = backoff.patience - elapsed
            if remaining <= 0:
                raise RetriesExhausted(error, tries, elapsed) from error
            wait = min(backoff.delay(tries - 1, jitter()), remaining)
            if on_retry is not None:
                on_retry(error, tries, wait, elapsed)
            sleep(wait)
