"""A hand-set clock for tests that inject `now`/`clock` through constructors."""

from __future__ import annotations

T0 = 1_750_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s
