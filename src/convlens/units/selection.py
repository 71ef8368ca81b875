"""Which units of a group the workflow pictures: the top units by share of the activation, the most selective ones
(by their best concept AUROC) and a few of those firing on the most images, read from ``statistics.json``.

A unit can be chosen for several reasons; it is pictured once and keeps every reason, so that the report can say
why it is there. Dead units are never chosen.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

BY_SHARE, SELECTIVE, FREQUENT = "share", "selective", "frequent"


@dataclasses.dataclass(frozen=True)
class UnitChoice:
    """How many units of each kind a group pictures."""

    by_share: int
    selective: int = 0
    frequent: int = 0

    @property
    def total(self) -> int:
        return self.by_share + self.selective + self.frequent


def _auroc(record: dict[str, Any]) -> float:
    best = record.get("best_concept") or {}
    value = best.get("auroc")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def choose_units(records: Sequence[dict[str, Any]], choice: UnitChoice) -> dict[int, list[str]]:
    """Unit -> the reasons it was chosen, in picture order: by share first (rank 1 first), then the most
    selective not chosen yet, then the most frequent not chosen yet. The ``selective`` most selective units are
    always among the chosen (marked so even when their share chose them already); so are ``by_share`` top units.
    ``frequent`` adds units firing on the most images (then on the most positions) that no other reason chose."""
    alive = [r for r in records if not r.get("dead")]
    chosen: dict[int, list[str]] = {}
    by_rank = sorted(alive, key=lambda r: (r["rank"], r["unit"]))
    for record in by_rank[: choice.by_share]:
        chosen[record["unit"]] = [BY_SHARE]
    scored = [r for r in alive if _auroc(r) > -math.inf]
    by_auroc = sorted(scored, key=lambda r: (-_auroc(r), r["rank"], r["unit"]))
    for record in by_auroc[: choice.selective]:
        chosen.setdefault(record["unit"], []).append(SELECTIVE)
    by_frequency = sorted(
        (r for r in alive if r["unit"] not in chosen),
        key=lambda r: (-r.get("image_frequency", 0.0), -r.get("frequency", 0.0), r["rank"], r["unit"]),
    )
    for record in by_frequency[: choice.frequent]:
        chosen[record["unit"]] = [FREQUENT]
    return chosen
