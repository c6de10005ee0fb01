"""What every tool module provides, and what its mapping returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Parameters = Mapping[str, Any]


@dataclass(frozen=True)
class BuildContext:
    """Everything impure or per-project a mapping needs, passed in."""

    now: float
    new_event_id: Callable[[], str]
    phone_region: str | None = None  # ISO alpha-2 for national phone numbers
    test_event_code: str | None = None  # the project's default, if any


@dataclass(frozen=True)
class EventBatch:
    """Server events for one pixel: the body of one Graph /events request, less credentials."""

    pixel_id: str
    events: list[dict[str, Any]]
    test_event_code: str | None = None

    @property
    def event_ids(self) -> list[str]:
        return [str(e["event_id"]) for e in self.events if "event_id" in e]


def as_json(answer: Mapping[str, Any], _parameters: Parameters) -> Any:
    return answer


@dataclass(frozen=True)
class Tool:
    name: str
    integration: str
    description: str
    schema: Mapping[str, Any] = field(repr=False)
    # Schema-valid parameters -> events; raises InvalidParameters for what Meta would reject.
    build: Callable[[Parameters, BuildContext], EventBatch] = field(repr=False)
    # Meta's answer -> what the caller gets: the JSON object, or text (e.g. markdown).
    present: Callable[[Mapping[str, Any], Parameters], Any] = field(default=as_json, repr=False)
