"""Rule-based pairwise judges for the odpo tests, named in a plan as `rulejudges:<function>`
(contract of a `callable` judge: f(prompts, a, b, **columns) -> P(a ≻ b) per pair)."""

from __future__ import annotations

import math


def shorter(prompts, a, b, **columns):
    """Prefers the shorter answer, softly: P(a ≻ b) = σ(len(b) − len(a)) over characters."""
    return [1.0 / (1.0 + math.exp(len(x) - len(y))) for x, y in zip(a, b)]
