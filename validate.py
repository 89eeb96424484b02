"""Kleis input checks: untrusted JSON bodies and their fields, turned into plain values or a
`BadRequest` that says which field is wrong and what it must be.

Shared by the admin API, the key and account operations and the CLI (which builds the same
bodies from its flags), so a rule is written once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from errors import BadRequest, InvalidJson
from providers import epoch_ms

MAX_DEPTH = 32  # levels of nesting an admin body may have (auth files and metadata need ~4)
MAX_INT = 2**53  # the integers every JSON client reads exactly; fits the database's BIGINT


BODY = "the request body"


CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL


def parse_json(raw: bytes | str, what: str = BODY) -> Any:
    """Untrusted JSON text as plain values, or a 400 naming `what` and the problem:
    `InvalidJson` for text that is not JSON, nested past the parser's limit, or using the
    NaN/Infinity literals; `BadRequest` (via `check_json`) for values Kleis cannot store or
    send back exactly."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        problem = f"{exc.msg} (line {exc.lineno} column {exc.colno})"
    except UnicodeDecodeError:
        problem = "it is not UTF-8 text"
    except RecursionError:
        problem = f"nested far more than the {MAX_DEPTH} levels Kleis takes"
    except ValueError as exc:  # NaN/Infinity (see _no_constant), or an integer of over 4,300 digits
        problem = str(exc) if isinstance(exc, _Constant) else "a number has too many digits"
    else:
        check_json(value, what)
        return value
    raise InvalidJson(f"{what} is not valid JSON: {problem}")


class _Constant(ValueError):
    def __str__(self) -> str:
        return f"{self.args[0]} is not a JSON number"


def _no_constant(name: str) -> Any:
    raise _Constant(name)


def check_json(value: Any, what: str = BODY) -> None:
    """Raise BadRequest unless every value in parsed JSON can be stored and answered exactly:
        at most MAX_DEPTH levels, integers within ±2^53, finite numbers (`1e400` parses as
        infinity), strings and keys without lone surrogates (`"\\ud800"`, which no database or
        UTF-8 encoder takes). The message names the top-level field (`what.field` unless `what`
    is the request body). Iterative: any depth and
        size is checked in linear time without recursion."""
    top = "" if what == BODY else what + "."
    stack: list[tuple[Any, int, str]] = [(value, 0, what)]
    while stack:
        item, depth, field = stack.pop()
        if isinstance(item, str):
            _check_text(item, field)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not -MAX_INT <= item <= MAX_INT:
                raise BadRequest(f"{field}: integers must be between {-MAX_INT} and {MAX_INT}")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise BadRequest(f"{field}: numbers must be finite (1e400 is not)")
        elif isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise BadRequest(f"{field}: nested more than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key, field)
                    stack.append((child, depth + 1, top + key[:60] if depth == 0 else field))
            else:
                stack.extend((child, depth + 1, field) for child in item)


def _check_text(text: str, field: str) -> None:
    if "\x00" in text:  # PostgreSQL text cannot hold it; no field has a use for it
        raise BadRequest(f"{field[:60]}: text must not contain NUL (\\u0000)")
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"{field[:60]}: text must be valid Unicode (a lone surrogate such as \\ud800 is not)"
        ) from None


def json_object(raw: bytes | None, allowed: Iterable[str], required: Iterable[str] = ()) -> dict:
    """The body's JSON object with only `allowed` fields (empty body = {}); `required` fields
    must be present and non-empty. Raises InvalidJson / BadRequest (see `parse_json`)."""
    allowed = list(allowed)
    body: Any = parse_json(raw) if raw and raw.strip() else {}
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        named = ", ".join(name[:40] for name in unknown[:10]) + (", …" if len(unknown) > 10 else "")
        raise BadRequest(f"unknown field(s): {named}; allowed: {', '.join(allowed)}")
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
    if CONTROL.search(value):  # names are shown in tables and terminals: one plain line
        raise BadRequest(f"{name} must not contain control characters")
    return value or None


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
    if any(CONTROL.search(v) for v in value):
        raise BadRequest(f"{name} must not contain control characters")
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
