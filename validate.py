"""Kleis input checks: untrusted JSON bodies and their fields, turned into plain values or a
`BadRequest` that says which field is wrong and what it must be.

Shared by the admin API, the key and account operations and the CLI (which builds the same
bodies from its flags), so a rule is written once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from errors import BadRequest, InvalidJson
from providers import epoch_ms


def json_object(raw: bytes | None, allowed: Iterable[str], required: Iterable[str] = ()) -> dict:
    """The body's JSON object with only `allowed` fields (empty body = {}); `required` fields
    must be present and non-empty."""
    allowed = list(allowed)
    if not raw or not raw.strip():
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidJson("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    missing = [f for f in required if body.get(f) in (None, "")]
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(missing)}")
    return body


def opt_str(body: dict, name: str, max_len: int = 200) -> str | None:
    """A trimmed string, None when absent or blank."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    value = value.strip()
    if len(value) > max_len:
        raise BadRequest(f"{name} must be at most {max_len} characters")
    return value or None


MAX_INT = 2**53  # the integers every JSON client reads exactly; fits the database's BIGINT


def opt_int(body: dict, name: str) -> int | None:
    """An integer within ±2^53, None when absent."""
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise BadRequest(f"{name} must be an integer")
    if not -MAX_INT <= value <= MAX_INT:
        raise BadRequest(f"{name} must be between {-MAX_INT} and {MAX_INT}")
    return value


def opt_bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and type(value) is not bool:
        raise BadRequest(f"{name} must be true or false")
    return value


def str_list(body: dict, name: str, max_items: int = 200) -> list[str] | None:
    """Distinct trimmed non-empty strings in their order; None when absent or empty."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise BadRequest(f"{name} must be a list of non-empty strings")
    if len(value) > max_items:
        raise BadRequest(f"{name} may hold at most {max_items} entries")
    return list(dict.fromkeys(v.strip() for v in value)) or None


def future_ms(value: int | None, name: str, now: int) -> int | None:
    """Seconds or milliseconds since the epoch (see providers.epoch_ms), which must lie in the
    future; None stays None."""
    if value is None:
        return None
    ms = epoch_ms(value)
    if ms is None or ms <= now:
        raise BadRequest(f"{name} must be in the future")
    return ms
