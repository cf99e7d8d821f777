"""Token reconciliation: the prompt tokens the gateway counted against those the upstream
reported, from the rollups (usage.models.TOKEN_COLUMNS says what each column holds).

Shared by the monitoring API (`/api/usage/stats`, `/api/usage/reconciliation`) and anyone else
who shows the comparison (the dashboard's panel).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal

from common.timeframes import TimeFrame
from usage.filters import UsageFilters
from usage.models import TOKEN_COLUMNS
from usage.rollup_reads import rollup_merge
from usage.selectors import Tokens

ModelColumn = Literal["upstream_model", "requested_model"]


@dataclass(frozen=True, slots=True)
class Reconciliation:
    # Over every call whose prompt was counted: as the client sent it, and as forwarded.
    counted_prompt_tokens: int = 0
    forwarded_prompt_tokens: int = 0
    # Total tokens of calls whose usage the upstream reported (estimates left out).
    backend_reported_total_tokens: int = 0
    # Over the calls that have both a count and reported usage: each side of the comparison.
    compared_reported_prompt_tokens: int = 0
    compared_counted_prompt_tokens: int = 0

    @property
    def difference_tokens(self) -> int:
        """Reported minus counted prompt tokens (positive: the upstream counted more)."""
        return self.compared_reported_prompt_tokens - self.compared_counted_prompt_tokens

    @property
    def difference_percent(self) -> float | None:
        """`difference_tokens` as a percentage of the counted side; None with nothing to
        compare."""
        counted = self.compared_counted_prompt_tokens
        return 100 * self.difference_tokens / counted if counted else None

    @property
    def empty(self) -> bool:
        return not (
            self.counted_prompt_tokens
            or self.forwarded_prompt_tokens
            or self.backend_reported_total_tokens
        )


def reconciliation_of(tokens: Tokens) -> Reconciliation:
    return Reconciliation(
        counted_prompt_tokens=tokens.counted_prompt,
        forwarded_prompt_tokens=tokens.forwarded_prompt,
        backend_reported_total_tokens=tokens.reported,
        compared_reported_prompt_tokens=tokens.reconciled_reported,
        compared_counted_prompt_tokens=tokens.reconciled_counted,
    )


def reconciliation_sum(items: Iterable[Reconciliation]) -> Reconciliation:
    items = list(items)
    return Reconciliation(
        **{f.name: sum(getattr(r, f.name) for r in items) for f in fields(Reconciliation)}
    )


def _tokens(row: dict[str, Any]) -> Tokens:
    return Tokens(*(int(row.get(c) or 0) for c in TOKEN_COLUMNS))


def reconciliation_by_model(
    *,
    frame: TimeFrame,
    filters: UsageFilters,
    now: datetime,
    by: ModelColumn = "upstream_model",
) -> list[tuple[str, str, Reconciliation]]:
    """(provider, model, figures) per provider and model (`by`: the model called upstream, or
    the requested route), sorted; models with nothing counted or reported are left out."""
    assert by in ("upstream_model", "requested_model"), by
    merged = rollup_merge(
        frame, now=now, filters=filters, group=("provider", by),
        columns=("calls", *TOKEN_COLUMNS), extremes=False,
    )  # fmt: skip
    rows = [
        (str(provider), str(model), reconciliation_of(_tokens(row)))
        for (provider, model), row in merged.items()
    ]
    return sorted((r for r in rows if not r[2].empty), key=lambda r: (r[0], r[1]))
