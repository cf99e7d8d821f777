"""Model replacement experiments: the rules as the routing snapshot holds them, and the draw.

The draw is a hash, not a random generator: the same seed and request id (per-request rules)
or session id (per-session rules) always give the same answer, in every process and on every
rerun, with no state shared between workers. docs/replacement.md states the rules; the proxy
applies them (proxy/replacement.py).

A per-session rule replaces a session from its first turn (at or after `min_turn`) whose draw
succeeds, for `sticky_turns` turns, then returns it to its route for good. Drawing each turn
with probability p until one succeeds makes that first turn geometric, so it is computed in one
step from a single draw per session (inverse transform), rather than by replaying every turn.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keys.routing import DeploymentInfo

# 53 bits: every such integer over 2**53 is a float exactly, and below 1.0 (64 bits over 2**64
# rounds the largest ones up to 1.0, whose log1p is undefined).
_BITS = 53
_SCALE = float(1 << _BITS)
# A first turn past any turn a request can carry (turns are capped at 32767).
NEVER = 1 << 30


@dataclass(frozen=True, slots=True)
class ReplacementSpec:
    """One enabled rule of a route, resolved: its target's deployments are built at load."""

    name: str
    seed: str
    probability: float
    per_session: bool
    sticky_turns: int
    min_turn: int
    clients: frozenset[str]
    without_tools: bool
    without_images: bool
    active_from: float | None  # Unix time; None: no bound
    active_until: float | None
    target: str  # "provider/model" or "route <name>", for people
    deployments: tuple[DeploymentInfo, ...] = field(default=())

    def active(self, now: float) -> bool:
        return (self.active_from is None or now >= self.active_from) and (
            self.active_until is None or now < self.active_until
        )


def replacement_draw(seed: str, key: str) -> float:
    """A number in [0, 1), uniform over keys and fixed for a (seed, key) pair."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return unit_interval(digest)


def unit_interval(digest: bytes) -> float:
    """Eight bytes of a hash as a number in [0, 1)."""
    return (int.from_bytes(digest, "big") >> (64 - _BITS)) / _SCALE


def session_first_turn(seed: str, session_id: str, *, probability: float, min_turn: int) -> int:
    """The turn at which a per-session rule first replaces this session: each turn from
    `min_turn` (at least 1) on draws with `probability` until one succeeds. A huge number when
    the probability is 0."""
    start = max(min_turn, 1)
    if probability >= 1.0:
        return start
    if probability <= 0.0:
        return NEVER
    u = replacement_draw(seed, "session\x00" + session_id)
    # P(first success after k failures) = (1-p)^k p: k = floor(log(1-u) / log(1-p)). A tiny
    # probability makes the quotient huge (or infinite): the session is then never replaced.
    failures = math.log1p(-u) / math.log1p(-probability)
    return start + int(failures) if failures < NEVER else NEVER


def session_replaced(
    seed: str, session_id: str, turn: int, *, probability: float, min_turn: int, sticky: int
) -> tuple[bool, bool]:
    """(replaced at this turn, this turn starts the session's replacement)."""
    first = session_first_turn(seed, session_id, probability=probability, min_turn=min_turn)
    return first <= turn < first + sticky, turn == first
