"""Durations as people read them, for the CLI and the console."""

from __future__ import annotations


def human_age(seconds: float) -> str:
    """`3m 12s`, `2d 4h`: the two largest units."""
    left = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, size)
        if count or parts or unit == "s":
            parts.append(f"{count}{unit}")
    return " ".join(parts[:2])
