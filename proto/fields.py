"""Typed field access on decoded msgpack maps, raising wire errors that name the field.

This is the only place that turns untyped wire maps into Python values; message
classes describe their fields with it instead of repeating isinstance checks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from proto.errors import InvalidValue, LimitExceeded, MissingField, WrongType
from proto.tensor import DecodeBudget, tensor_from_wire

__all__ = ["FieldReader"]

_MISSING = object()


class FieldReader:
    """Reads fields of one wire map; ``path`` prefixes every error's field name."""

    def __init__(self, obj: Any, path: str, budget: DecodeBudget) -> None:
        if not isinstance(obj, dict):
            raise WrongType(path or "message", "a map", obj)
        self.obj = obj
        self.path = path
        self.budget = budget

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        """Present and not nil: msgpack peers often send nil for "absent"."""
        return self.obj.get(key) is not None

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The value, ``default`` when absent or nil, ``MissingField`` when required."""
        value = self.obj.get(key)
        if value is not None:
            return value
        if default is _MISSING:
            raise MissingField(self.name(key))
        return default

    def int(self, key: str, default: Any = _MISSING, *, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        if not self.has(key):
            return self.raw(key, default)
        return _check_int(self.name(key), self.obj[key], minimum, maximum)

    def float(self, key: str, default: Any = _MISSING, *, minimum: float | None = None,
              maximum: float | None = None) -> Any:
        if not self.has(key):
            return self.raw(key, default)
        value = self.obj[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WrongType(self.name(key), "a number", value)
        value = float(value)
        if not math.isfinite(value):
            raise InvalidValue(self.name(key), "must be finite", value)
        if minimum is not None and value < minimum:
            raise InvalidValue(self.name(key), f"must be >= {minimum}", value)
        if maximum is not None and value > maximum:
            raise InvalidValue(self.name(key), f"must be <= {maximum}", value)
        return value

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        if not self.has(key):
            return self.raw(key, default)
        value = self.obj[key]
        if not isinstance(value, bool):
            raise WrongType(self.name(key), "a bool", value)
        return value

    def str(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] | None = None) -> Any:
        if not self.has(key):
            return self.raw(key, default)
        value = self.obj[key]
        if not isinstance(value, str):
            raise WrongType(self.name(key), "a string", value)
        if choices is not None and value not in choices:
            raise InvalidValue(self.name(key), f"must be one of {list(choices)}", value)
        return value

    def list(self, key: str, default: Any = _MISSING, *, max_len: int | None = None) -> Any:
        if not self.has(key):
            return self.raw(key, default)
        value = self.obj[key]
        if not isinstance(value, list):
            raise WrongType(self.name(key), "a list", value)
        limit = max_len if max_len is not None else self.budget.limits.max_list_len
        if len(value) > limit:
            raise LimitExceeded(self.name(key), "list length", len(value), limit)
        return value

    def int_list(self, key: str, default: Any = _MISSING, *, minimum: int | None = None,
                 maximum: int | None = None, max_len: int | None = None) -> Any:
        if not self.has(key):
            return self.raw(key, default)
        field = self.name(key)
        values = self.list(key, max_len=max_len)
        return [_check_int(f"{field}[{i}]", v, minimum, maximum) for i, v in enumerate(values)]

    def str_list(self, key: str, default: Any = _MISSING, *, max_len: int | None = None) -> Any:
        if not self.has(key):
            return self.raw(key, default)
        values = self.list(key, max_len=max_len)
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise WrongType(f"{self.name(key)}[{i}]", "a string", value)
        return values

    def bytes_list(self, key: str, default: Any = _MISSING, *, max_len: int | None = None) -> Any:
        if not self.has(key):
            return self.raw(key, default)
        values = self.list(key, max_len=max_len)
        for i, value in enumerate(values):
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise WrongType(f"{self.name(key)}[{i}]", "bin (raw bytes)", value)
        return values

    def tensor(self, key: str) -> torch.Tensor | None:
        """An optional tensor field (nil or absent → None)."""
        if not self.has(key):
            return None
        return tensor_from_wire(self.obj[key], self.name(key), self.budget)

    def timings(self, key: str = "timings") -> dict[str, float]:
        """Per-stage timings in milliseconds: a small map of name → number."""
        value = self.raw(key, {})
        if not isinstance(value, dict):
            raise WrongType(self.name(key), "a map of stage name to milliseconds", value)
        if len(value) > self.budget.limits.max_map_len:
            raise LimitExceeded(self.name(key), "entries", len(value), self.budget.limits.max_map_len)
        out: dict[str, float] = {}
        for stage, ms in value.items():
            if isinstance(ms, bool) or not isinstance(ms, (int, float)):
                raise WrongType(f"{self.name(key)}.{stage}", "a number (milliseconds)", ms)
            out[stage] = float(ms)
        return out

    def child(self, key: str, default: Any = _MISSING) -> FieldReader | None:
        if not self.has(key):
            return self.raw(key, default)
        return FieldReader(self.obj[key], self.name(key), self.budget)


def _check_int(field: str, value: Any, minimum: int | None, maximum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WrongType(field, "an int", value)
    if minimum is not None and value < minimum:
        raise InvalidValue(field, f"must be >= {minimum}", value)
    if maximum is not None and value > maximum:
        raise InvalidValue(field, f"must be <= {maximum}", value)
    return value
