"""Typed readers for a YAML/JSON document that record each problem with its path and go on.

keys.config_schema builds the config parser on them, so that one import reports every error at
once instead of stopping at the first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core.exceptions import ValidationError

_MISSING = object()


class _Reader:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    # -- small typed readers; each returns _MISSING after recording an error ------------------

    def mapping(self, value: Any, path: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping, got {_type_name(value)}")
            return None
        return value

    def fields(
        self, entry: dict[str, Any], path: str, allowed: set[str], required: set[str]
    ) -> bool:
        ok = True
        for name in entry:
            if name not in allowed:
                self.error(
                    f"{path}.{name}",
                    f"unknown field; expected one of {', '.join(sorted(allowed))}",
                )
                ok = False
        for name in sorted(required - entry.keys()):
            self.error(f"{path}.{name}", "required")
            ok = False
        return ok

    def string(
        self,
        value: Any,
        path: str,
        *,
        max_length: int,
        check: Callable[[str], None] | None = None,
    ) -> Any:
        if not isinstance(value, str) or not value.strip():
            self.error(path, f"expected a non-empty string, got {_type_name(value)}")
            return _MISSING
        if len(value) > max_length:
            self.error(path, f"longer than {max_length} characters")
            return _MISSING
        if check is not None:
            try:
                check(value)
            except ValidationError as exc:
                self.error(path, "; ".join(exc.messages))
                return _MISSING
        return value

    def integer(self, value: Any, path: str, *, minimum: int) -> Any:
        # bool is an int in Python; `weight: true` is a mistake, not 1.
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(path, f"expected an integer, got {_type_name(value)}")
            return _MISSING
        if value < minimum:
            self.error(path, f"must be at least {minimum}")
            return _MISSING
        return value

    def boolean(self, value: Any, path: str) -> Any:
        if not isinstance(value, bool):
            self.error(path, f"expected true or false, got {_type_name(value)}")
            return _MISSING
        return value

    def string_list(self, value: Any, path: str, *, max_length: int) -> Any:
        if not isinstance(value, list):
            self.error(path, f"expected a list, got {_type_name(value)}")
            return _MISSING
        out = []
        for i, item in enumerate(value):
            parsed = self.string(item, f"{path}[{i}]", max_length=max_length)
            if parsed is _MISSING:
                return _MISSING
            out.append(parsed)
        return out

    def choice(self, value: Any, path: str, choices: list[str]) -> Any:
        if value not in choices:
            self.error(
                path, f"unknown value {value!r}; expected one of {', '.join(sorted(choices))}"
            )
            return _MISSING
        return value


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)
