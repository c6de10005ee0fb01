"""What a tool is, what its mapping gets and returns, and how it refuses parameters.

Nothing here knows HTTP: `InvalidEvent` carries no status; the server translates it once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Parameters = Mapping[str, Any]


@dataclass(frozen=True)
class Violation:
    """One reason a parameter is unacceptable; `path` is dotted, e.g. `parameters.eventTime`."""

    path: str
    message: str


class InvalidEvent(ValueError):
    """Schema-valid parameters that Meta would reject; lists every reason, never a value."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__(f"{len(violations)} violation(s)")
        self.violations = violations


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
    # What mapping dropped or changed in meaning (a key not sent, a ZIP+4 cut, ...), for the
    # caller's answer; never sent to Meta, never a value.
    warnings: list[Violation] = field(default_factory=list)

    @property
    def event_ids(self) -> list[str]:
        return [str(e["event_id"]) for e in self.events if "event_id" in e]


@dataclass(frozen=True)
class JsonAnswer:
    body: Mapping[str, Any]


@dataclass(frozen=True)
class TextAnswer:
    """A human format, e.g. markdown for people and agents."""

    text: str
    media_type: str


Answer = JsonAnswer | TextAnswer


def as_json(answer: Mapping[str, Any], _parameters: Parameters) -> Answer:
    return JsonAnswer(answer)


@dataclass(frozen=True)
class Integration:
    """An ActionKit integration: its name keys List Tools' groups; categories filter them."""

    name: str
    categories: tuple[str, ...]


FACEBOOK_ADS = Integration("facebookAds", ("advertising",))


@dataclass(frozen=True)
class Tool:
    """One tool, declared once in its module.

    `schema` names its parameters schema in openapi.json's `components.schemas`; `extensions`
    name components whose properties are merged in (the catalog resolves both).
    """

    name: str
    title: str  # a display name, for MCP hosts
    integration: Integration
    description: str
    schema: str
    # Schema-valid parameters -> events; raises InvalidEvent for what Meta would reject.
    build: Callable[[Parameters, BuildContext], EventBatch] = field(repr=False)
    # Meta's answer -> what the caller gets.
    present: Callable[[Mapping[str, Any], Parameters], Answer] = field(default=as_json, repr=False)
    extensions: tuple[str, ...] = ()
