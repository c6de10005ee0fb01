"""Attempt timeouts that follow Meta's latency, so a slow Meta does not turn one event into
several: a request cut at its timeout may still be processed by Meta, and its resend is then
a second copy (deduplicated only when the event_id matches). After a timeout the next attempts
wait twice as long; as quick answers return, the timeout comes back down to its floor.
"""

from __future__ import annotations

# Per answer, the remembered slowest latency shrinks by this factor: after 64 quick answers
# a slow one counts for 4 % of itself.
DECAY = 0.95


class AttemptTimeouts:
    """Twice the slowest recent latency, between a floor and a ceiling (O(1) per answer: it
    runs on every sync call)."""

    def __init__(self, floor: float, *, ceiling: float = 60.0) -> None:
        self._floor = floor
        self._ceiling = max(ceiling, floor)
        self._slowest = 0.0  # seconds, decaying
        self._current = floor

    def current(self) -> float:
        return self._current

    def answered(self, seconds: float) -> None:
        self._slowest = max(seconds, self._slowest * DECAY)
        self._current = min(self._ceiling, max(self._floor, 2.0 * self._slowest))

    def timed_out(self, timeout: float) -> None:
        """An attempt got no answer in `timeout`: the latency is at least that."""
        self._slowest = max(timeout, self._slowest)
        self._current = min(self._ceiling, max(self._floor, 2.0 * self._slowest))
