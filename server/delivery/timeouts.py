"""Attempt timeouts that follow Meta's latency, so a slow Meta does not turn one event into
several: a request cut at its timeout may still be processed by Meta, and its resend is then
a second copy (deduplicated only when the event_id matches). After a timeout the next attempts
wait twice as long; as quick answers return, the timeout comes back down to its floor.
"""

from __future__ import annotations

from collections import deque


class AttemptTimeouts:
    def __init__(self, floor: float, *, ceiling: float = 60.0, window: int = 64) -> None:
        self._floor = floor
        self._ceiling = max(ceiling, floor)
        self._recent: deque[float] = deque(maxlen=window)  # seconds of the latest attempts
        self._current = floor

    def current(self) -> float:
        return self._current

    def answered(self, seconds: float) -> None:
        self._recent.append(seconds)
        self._update()

    def timed_out(self, timeout: float) -> None:
        """An attempt got no answer in `timeout`: the latency is at least that."""
        self._recent.append(timeout)
        self._update()

    def _update(self) -> None:
        # Twice the slowest recent attempt: room for Meta's tail without waiting forever.
        self._current = min(self._ceiling, max(self._floor, 2.0 * max(self._recent)))
