"""What the device unit tests share: an interrupt line that records every level it is set
to, and a clock that moves only when the test says."""
from __future__ import annotations


class RecordingLine:
    """An interrupt line (``set_level``) that keeps every level it was set to, in order."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.levels.append(level)

    @property
    def level(self) -> bool:
        """The last level set (low before the first one)."""
        return bool(self.levels) and self.levels[-1]

    @property
    def rising_edges(self) -> int:
        """How many times the line went from low to high."""
        return sum(1 for a, b in zip([False] + self.levels, self.levels) if b and not a)


class StepClock:
    """Nanoseconds that move only when the test says (the guest clock, or host UTC)."""

    def __init__(self, ns: int = 0) -> None:
        self.ns = ns

    def now(self) -> int:
        return self.ns
