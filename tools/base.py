"""What every tool module provides, and what its mapping returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Parameters = Mapping[str, Any]


@dataclass(frozen=True)
class BuildContext:
    """Everything impure a mapping needs, passed in: the clock and the id source."""

    now: float
    new_event_id: Callable[[], str]


@dataclass(frozen=True)
class EventBatch:
    """Server events for one pixel: the body of one Graph /events request, less credentials."""

    pixel_id: str
    events: list[dict[str, Any]]
    test_event_code: str | None = None

    @property
    def event_ids(self) -> list[str]:
        return [str(e["event_id"]) for e in self.events if "event_id" in e]


@dataclass(frozen=True)
class Tool:
    name: str
    integration: str
    description: str
    schema: Mapping[str, Any] = field(repr=False)
    # Schema-valid parameters -> events; raises InvalidParameters for what Meta would reject.
    build: Callable[[Parameters, BuildContext], EventBatch] = field(repr=False)
