"""The filters every usage endpoint accepts, over rollups (usage.rollup_reads) and raw call
records (usage.record_selectors) alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["success", "error"]


@dataclass(frozen=True, slots=True)
class UsageFilters:
    """The filters every usage endpoint accepts; None means "any"."""

    provider: str | None = None
    model: str | None = None
    key: str | None = None
    client: str | None = None
    status: Status | None = None
    stream: bool | None = None

    def equalities(self) -> dict[str, Any]:
        """column → value for the filters that are plain equalities, on columns that call
        records and rollups share (`status` is not: see its two readings below and in
        usage.record_selectors)."""
        pairs = (
            ("provider", self.provider),
            ("requested_model", self.model),
            ("key_id", self.key),
            ("client", self.client),
            ("stream", self.stream),
        )
        return {column: value for column, value in pairs if value is not None}

    def rollup_where(self) -> tuple[list[str], list[Any]]:
        """SQL conditions (and their parameters) on the rollup dimensions."""
        equal = self.equalities()
        if self.status is not None:
            equal["ok"] = self.status == "success"
        return [f"{column} = %s" for column in equal], list(equal.values())
