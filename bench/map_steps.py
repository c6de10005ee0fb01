"""Where the map core's time goes: µs per step for one full funnel event (timeit, best of 5).

.venv/bin/python bench/map_steps.py
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable

from benchlib import parameters, table

from tools import actionkit, capi, hashing, values
from tools.base import BuildContext
from tools.catalog import load_catalog

NUMBER = 20_000


def best_us(fn: Callable[[], object]) -> float:
    return min(timeit.repeat(fn, number=NUMBER, repeat=5)) / NUMBER * 1e6


def main() -> None:
    now = time.time()
    full = parameters(0, "steps", now)  # the mix's first event: full customer data
    tool = load_catalog()["FACEBOOK_ADS_SEND_FUNNEL_EVENT"].tool
    ctx = BuildContext(now=now, new_event_id=lambda: "id")
    event = tool.build(full, ctx).events[0]
    rows: list[tuple[str, float]] = [
        ("whole build (map, rules, normalise, hash)", best_us(lambda: tool.build(full, ctx)))
    ]
    for key, name in (
        ("em", "customerEmail"),
        ("fn", "customerFirstName"),
        ("ln", "customerLastName"),
        ("external_id", "customerExternalId"),
        ("ct", "customerCity"),
        ("st", "customerState"),
        ("country", "customerCountryCode"),
    ):
        rows.append(
            (
                f"hash_value {key}",
                best_us(lambda k=key, n=name: hashing.hash_value(k, full[n], country="us")),
            )
        )
    rows += [
        ("sha256 of one short string", best_us(lambda: hashing.sha256_hex("joe@example.com"))),
        ("parse_event_time", best_us(lambda: values.parse_event_time(full["eventTime"]))),
        ("parse_content_ids ['SKU-9']", best_us(lambda: values.parse_content_ids("['SKU-9']"))),
        ("parse_content_ids SKU-1,SKU-2", best_us(lambda: values.parse_content_ids("SKU-1,SKU-2"))),
        (
            "check_event (Meta's rules)",
            best_us(lambda: capi.check_event(event, now=now, path_of=actionkit._path_of)),
        ),
        ("pixel_violations", best_us(lambda: capi.pixel_violations(full["pixel"], "p"))),
    ]
    print(table(["step (one full event)", "µs"], [(label, f"{us:.2f}") for label, us in rows]))


if __name__ == "__main__":
    main()
