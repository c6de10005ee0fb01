"""The event as Meta receives it, made fit to show an operator: a SHA-256 digest stays (it
reads as nothing), every value Meta takes raw, and every value of unknown meaning, becomes
PRESENT.

| Where                                                 | Shown                              |
|-------------------------------------------------------|------------------------------------|
| user_data keys Meta wants hashed (HASHED_KEYS)        | the 64-hex digests; else PRESENT   |
| user_data, every other key (client_ip_address,        | PRESENT                            |
|   client_user_agent, fbc, fbp, madid, lead_id, ...)   |                                    |
| event_name, event_time, event_id, action_source,      | as sent                            |
|   opt_out, data_processing_options(_country, _state)  |                                    |
| event_source_url, referrer_url                        | scheme, host, path; a query or a   |
|                                                       |   fragment becomes "?…"            |
| custom_data: Meta's standard keys (CUSTOM_KEYS)       | as sent (contents: CONTENT_KEYS)   |
| custom_data: search_string, any other key             | PRESENT                            |
| anything else (app_data, original_event_data, ...)    | PRESENT                            |

Meta's parameters: https://developers.facebook.com/docs/marketing-api/conversions-api/parameters
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tools.hashing import HASHED_KEYS, is_sha256_hex

PRESENT = "present"
SHOWN_KEYS = frozenset(
    {"event_name", "event_time", "event_id", "action_source", "opt_out",
     "data_processing_options", "data_processing_options_country",
     "data_processing_options_state"}
)  # fmt: skip
URL_KEYS = frozenset({"event_source_url", "referrer_url"})
CUSTOM_KEYS = frozenset(
    {"value", "currency", "content_name", "content_category", "content_ids", "contents",
     "content_type", "order_id", "predicted_ltv", "num_items", "status", "delivery_category"}
)  # fmt: skip
CONTENT_KEYS = frozenset({"id", "quantity", "item_price", "delivery_category"})


def shown_event(event: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for key, value in event.items():
        if key in SHOWN_KEYS:
            shown[key] = value
        elif key in URL_KEYS and isinstance(value, str):
            shown[key] = _url(value)
        elif key == "user_data" and isinstance(value, dict):
            shown[key] = {name: _user_value(name, item) for name, item in value.items()}
        elif key == "custom_data" and isinstance(value, dict):
            shown[key] = {name: _custom_value(name, item) for name, item in value.items()}
        else:
            shown[key] = PRESENT
    return shown


def _user_value(key: str, value: Any) -> Any:
    if key not in HASHED_KEYS:
        return PRESENT
    values = value if isinstance(value, list) else [value]
    if values and all(isinstance(v, str) and is_sha256_hex(v) for v in values):
        return value
    return PRESENT


def _custom_value(key: str, value: Any) -> Any:
    if key not in CUSTOM_KEYS:
        return PRESENT
    if key == "contents" and isinstance(value, list):
        return [
            {k: (v if k in CONTENT_KEYS else PRESENT) for k, v in item.items()}
            if isinstance(item, dict)
            else PRESENT
            for item in value
        ]
    return value


def _url(url: str) -> str:
    """The scheme, host and port only: user:password@, paths (`/u/jane@example.com/orders`),
    queries and fragments may all carry personal data."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return PRESENT
    if not parts.scheme or not parts.hostname:
        return PRESENT
    rest = "/…" if parts.path.strip("/") or parts.query or parts.fragment else parts.path
    return f"{parts.scheme}://{parts.hostname}{port}{rest}"
