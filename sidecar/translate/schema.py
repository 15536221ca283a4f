"""A small structural checker for resource specs: types, enums, ranges, required and unknown fields.

The node types mirror the OpenAPI v3 constructs EG's CRDs use (object, array, string with pattern and
length, integer with bounds, enum, one-of). Each `check` raises ConfigError naming the resource and the
field path, and saying what was expected. Fields the translator does not implement are *unknown* here
on purpose: ignoring them silently would produce an Envoy that behaves differently from EG.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from sidecar.translate.resources import Resource

__all__ = ["ANY", "BOOL", "Duration", "Enum", "Int", "List", "Node", "Obj", "Str", "StrMap"]


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class Node:
    expected = "a value"

    def check(self, res: Resource, value: Any, path: str) -> None:
        raise NotImplementedError

    def fail(self, res: Resource, path: str, value: Any, expected: str | None = None) -> Exception:
        return res.error(path, f"expected {expected or self.expected}, got {value!r}")


class _Any(Node):
    def check(self, res: Resource, value: Any, path: str) -> None:
        return None


class _Bool(Node):
    expected = "true or false"

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise self.fail(res, path, value)


ANY = _Any()
BOOL = _Bool()


class Str(Node):
    def __init__(self, pattern: str | None = None, max_len: int = 253, min_len: int = 1, what: str = "") -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.max_len = max_len
        self.min_len = min_len
        self.expected = what or f"a string of {min_len} to {max_len} characters"

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not isinstance(value, str) or not self.min_len <= len(value) <= self.max_len:
            raise self.fail(res, path, value)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise self.fail(res, path, value)


class Duration(Str):
    """Gateway API durations: up to four `<number><unit>` groups, units h, m, s, ms."""

    def __init__(self) -> None:
        super().__init__(r"([0-9]{1,5}(h|m|s|ms)){1,4}", 64, what="a duration such as 500ms, 5s or 1m30s")


class Int(Node):
    def __init__(self, minimum: int, maximum: int) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.expected = f"an integer from {minimum} to {maximum}"

    def check(self, res: Resource, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not self.minimum <= value <= self.maximum:
            raise self.fail(res, path, value)


class Enum(Node):
    def __init__(self, *values: Any) -> None:
        self.values = values
        self.expected = "one of " + ", ".join(str(v) for v in values)

    def check(self, res: Resource, value: Any, path: str) -> None:
        if value not in self.values or isinstance(value, bool) != isinstance(self.values[0], bool):
            raise self.fail(res, path, value)


class List(Node):
    def __init__(self, item: Node, max_items: int = 64, min_items: int = 0) -> None:
        self.item = item
        self.max_items = max_items
        self.min_items = min_items
        self.expected = f"a list of {min_items} to {max_items} items"

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not isinstance(value, list) or not self.min_items <= len(value) <= self.max_items:
            raise self.fail(res, path, value if not isinstance(value, list) else f"{len(value)} items")
        for index, item in enumerate(value):
            self.item.check(res, item, _join(path, index))


class StrMap(Node):
    expected = "a mapping of strings to strings"

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise self.fail(res, path, value)


class Obj(Node):
    """A mapping with known fields. `one_of` groups need exactly one member set; `at_most_one` at most one."""

    expected = "a mapping"

    def __init__(
        self,
        fields: Mapping[str, Node],
        required: Sequence[str] = (),
        one_of: Sequence[Sequence[str]] = (),
        at_most_one: Sequence[Sequence[str]] = (),
    ) -> None:
        self.fields = dict(fields)
        self.required = tuple(required)
        self.one_of = tuple(tuple(g) for g in one_of)
        self.at_most_one = tuple(tuple(g) for g in at_most_one)

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise self.fail(res, path, value)
        for key in value:
            if key not in self.fields:
                known = ", ".join(sorted(self.fields)) or "none"
                raise res.error(_join(path, str(key)), f"unknown or unsupported field (expected one of {known})")
        for key in self.required:
            if key not in value:
                raise res.error(_join(path, key), "required field is missing")
        for group in self.one_of:
            present = [k for k in group if value.get(k) is not None]
            if len(present) != 1:
                raise res.error(
                    path or "spec",
                    f"expected exactly one of {', '.join(group)}, got {', '.join(present) if present else 'none'}",
                )
        for group in self.at_most_one:
            present = [k for k in group if value.get(k) is not None]
            if len(present) > 1:
                raise res.error(path or "spec", f"expected at most one of {', '.join(group)}, got {', '.join(present)}")
        for key, item in value.items():
            if item is not None:
                self.fields[key].check(res, item, _join(path, key))
