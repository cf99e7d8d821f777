"""The filters every usage endpoint accepts, over rollups (usage.rollup_reads) and raw call
records (usage.record_selectors) alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from django.db.models import Q

Status = Literal["success", "error"]

# Filters on values without a bounded set (one per session, caller, browser origin): no rollup
# carries them, so only the raw-record reads (recent, events, export) can apply them.
RECORD_ONLY_FILTERS = ("session_id", "user_agent", "origin")


@dataclass(frozen=True, slots=True)
class UsageFilters:
    """The filters every usage endpoint accepts; None means "any"."""

    provider: str | None = None
    model: str | None = None
    key: str | None = None
    client: str | None = None
    status: Status | None = None
    stream: bool | None = None
    upstream_model: str | None = None
    # The HTTP status the client got: only requests' final rows carry one (rollups hold 0 on
    # the other rows, records NULL), so this selects requests that ended with it.
    client_status: int | None = None
    operation: str | None = None
    session_id: str | None = None
    user_agent: str | None = None
    origin: str | None = None
    experiment: str | None = None
    arm: str | None = None
    # Only requests of some replacement experiment (rollups only: the metrics' one read).
    in_experiment: bool = False

    def equalities(self) -> dict[str, Any]:
        """column → value for the filters that are plain equalities, on columns that call
        records and rollups share (`status` is not: see its two readings below and in
        usage.record_selectors)."""
        pairs = (
            ("provider", self.provider),
            ("requested_model", self.model),
            ("upstream_model", self.upstream_model),
            ("key_id", self.key),
            ("client", self.client),
            ("stream", self.stream),
            ("client_status", self.client_status),
            ("operation", self.operation),
            ("experiment", self.experiment),
            ("arm", self.arm),
        )
        return {column: value for column, value in pairs if value is not None}

    def record_equalities(self) -> dict[str, Any]:
        """`equalities` plus the filters only call records can apply."""
        extra = {name: getattr(self, name) for name in RECORD_ONLY_FILTERS}
        return self.equalities() | {k: v for k, v in extra.items() if v is not None}

    def record_only(self) -> list[str]:
        """The filters set here that no rollup can apply."""
        return [name for name in RECORD_ONLY_FILTERS if getattr(self, name) is not None]

    def rollup_where(self) -> tuple[list[str], list[Any]]:
        """SQL conditions (and their parameters) on the rollup dimensions."""
        # A caller that reaches here with a record-only filter would get figures that ignore
        # it: the API refuses such queries before (a 422), so this is a bug, not input. Not an
        # assert: `python -O` would drop it and the figures would quietly ignore the filter.
        if self.record_only():
            raise ValueError(f"no rollup can apply {', '.join(self.record_only())}")
        equal = self.equalities()
        if self.status is not None:
            equal["ok"] = self.status == "success"
        conditions = [f"{column} = %s" for column in equal]
        if self.in_experiment:
            conditions.append("experiment <> ''")
        return conditions, list(equal.values())

    def conversation_q(self) -> Q:
        """The filters the session and tool rollups can apply (see `conversation_unsupported`)."""
        pairs = (("provider", self.provider), ("requested_model", self.model),
                 ("client", self.client))  # fmt: skip
        return Q(**{column: value for column, value in pairs if value is not None})

    def conversation_unsupported(self) -> list[str]:
        """Filters set here that the session and tool rollups cannot apply (they carry only
        provider, requested model and client)."""
        names = ("key", "status", "stream", "upstream_model", "client_status", "experiment", "arm")
        return [name for name in names if getattr(self, name) is not None] + self.record_only()
