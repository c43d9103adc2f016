"""Turning records into JSON bytes without ever losing a record to one bad value.

The fast path is one ``orjson.dumps`` call. Values orjson cannot take (objects, sets, bytes,
integers past 64 bits, numpy scalars of odd kinds, non-string keys it refuses) go through
``_fallback``; a record that still fails is rebuilt value by value by ``sanitize`` so only the
bad value is replaced. Values larger than ``max_value_bytes`` are replaced by a summary.

Both paths write a value the same way, so a record's line does not depend on whether another
value of it needed repair: NaN and +/-inf become ``null`` (as orjson writes them, and as strict
JSON readers need), and non-string keys become the strings orjson's ``OPT_NON_STR_KEYS`` makes.
"""

from __future__ import annotations

import base64
import logging
import math
from typing import Any, Dict, List

import orjson

logger = logging.getLogger(__name__)

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_LINE_OPTIONS = _OPTIONS | orjson.OPT_APPEND_NEWLINE
_REPR_LIMIT = 1000

max_value_bytes = 8 * 1024 * 1024  # set from project.max_value_bytes when Flowcept starts


def _describe(value: Any) -> Dict[str, Any]:
    try:
        text = repr(value)
    except Exception as error:  # a broken __repr__ must not cost the record
        text = f"<repr failed: {type(error).__name__}>"
    return {
        "__flowcept_unserializable__": type(value).__module__ + "." + type(value).__qualname__,
        "repr": text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT] + "...",
    }


def _fallback(value: Any) -> Any:
    """Orjson ``default=``: convert what it cannot serialise natively."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) > max_value_bytes:
            return {"__flowcept_truncated__": "bytes", "size_bytes": len(raw)}
        return {"__bytes_b64__": base64.b64encode(raw).decode("ascii")}
    if isinstance(value, complex):
        return {"real": value.real, "imag": value.imag}
    if isinstance(value, int):  # beyond 64 bits
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays orjson refused, torch tensors, ...
        try:
            return value.tolist()
        except Exception:
            pass
    if hasattr(value, "item"):
        try:
            return value.item()
        except Exception:
            pass
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "value") and hasattr(value, "name"):  # enums
        return value.value
    if hasattr(value, "to_dict"):
        try:
            return value.to_dict()
        except Exception:
            pass
    if hasattr(value, "__fspath__"):
        return str(value)
    return _describe(value)


def sanitize(value: Any, depth: int = 0) -> Any:
    """Return ``value`` rebuilt from JSON-safe parts; called only when the fast path failed."""
    if depth > 64:
        return _describe(value)
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # as orjson writes NaN/inf: null
    if isinstance(value, dict):
        return {_key(k): sanitize(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [sanitize(v, depth + 1) for v in value]
    try:
        converted = _fallback(value)
    except Exception:
        return _describe(value)
    if converted is value or isinstance(converted, dict) and "__flowcept_unserializable__" in converted:
        return converted
    return sanitize(converted, depth + 1)


def _key(key: Any) -> str:
    """A non-string key as orjson's OPT_NON_STR_KEYS writes it, so both paths agree.

    None -> "null", True -> "true", NaN -> "null", datetimes in ISO form, enums by value; keys
    orjson refuses (tuples, objects) -> ``str(key)``.
    """
    if isinstance(key, str):
        return key
    try:
        return next(iter(orjson.loads(orjson.dumps({key: None}, option=_OPTIONS))))
    except Exception:
        pass
    try:
        return str(key)
    except Exception:
        return repr(type(key))


def _shrink_large_values(record: Dict[str, Any]) -> Dict[str, Any]:
    """Replace top-level-and-one-down values that serialise past max_value_bytes by summaries."""
    out: Dict[str, Any] = {}
    for name, value in record.items():
        if isinstance(value, dict):
            inner = {}
            for key, item in value.items():
                inner[key] = _maybe_summary(item)
            out[name] = inner
        else:
            out[name] = _maybe_summary(value)
    return out


def _maybe_summary(value: Any) -> Any:
    try:
        size = len(orjson.dumps(value, default=_fallback, option=_OPTIONS))
    except Exception:
        value = sanitize(value)
        size = len(orjson.dumps(value, option=_OPTIONS))
    if size <= max_value_bytes:
        return value
    summary = _describe(value)
    summary["__flowcept_truncated__"] = True
    summary["size_bytes"] = size
    shape = getattr(value, "shape", None)
    if shape is not None:
        summary["shape"] = list(shape)
    return summary


def dumps_line(record: Dict[str, Any]) -> bytes:
    """Serialise one record as a JSON line ending in a newline; never raises."""
    try:
        line = orjson.dumps(record, default=_fallback, option=_LINE_OPTIONS)
    except Exception:
        try:
            line = orjson.dumps(sanitize(record), option=_LINE_OPTIONS)
        except Exception as error:  # pragma: no cover - sanitize yields JSON-safe values
            logger.error("record could not be serialised even after sanitising: %s", error)
            line = orjson.dumps({"type": record.get("type", "unknown"), "__flowcept_error__": str(error)},
                                option=_LINE_OPTIONS)
    if len(line) > max_value_bytes:
        try:
            shrunk = _shrink_large_values(record)
            try:
                line = orjson.dumps(shrunk, default=_fallback, option=_LINE_OPTIONS)
            except Exception:  # e.g. tuple keys below the values that were summarised
                line = orjson.dumps(sanitize(shrunk), option=_LINE_OPTIONS)
        except Exception as error:  # pragma: no cover - keep the full line rather than nothing
            logger.error("large record could not be shrunk: %s", error)
    return line


def dumps_lines(records: List[Dict[str, Any]]) -> bytes:
    """Serialise a batch as JSONL; one orjson call per record on the fast path; never raises."""
    dumps_ = orjson.dumps
    try:
        lines = [dumps_(r, default=_fallback, option=_LINE_OPTIONS) for r in records]
    except Exception:  # some record needs sanitising: redo the batch record by record
        return b"".join([dumps_line(r) for r in records])
    limit = max_value_bytes
    for index, line in enumerate(lines):
        if len(line) > limit:
            lines[index] = dumps_line(records[index])
    return b"".join(lines)


def dumps(record: Dict[str, Any]) -> bytes:
    """Serialise one record (no trailing newline); never raises."""
    return dumps_line(record)[:-1]


loads = orjson.loads
