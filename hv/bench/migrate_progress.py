"""How much work the dirty guest did while it was being migrated, to a fraction of a pass.

``hv bench migrate`` compares the guest's progress per second between ``migrate`` and the
source's STOP event (hv against QEMU). A 256 MiB KVM migration by hv lasts 0.1-0.2 s and
the guest's pass takes ~20 ms at full speed, but much longer while it takes the write
faults of the dirty log: counting whole pass lines in such a window gives 0, 1 or 2,
so the ratio to QEMU swung between 0.45 and 1.06 from one run of three to the next
(tcp and unix alike). :class:`LineClock` stamps every pass line as it appears on either
console (polling the serial files every few milliseconds, the same for both engines),
and :func:`guest_progress` turns the stamps into passes done inside the window:

* the pass in progress when ``migrate`` was sent had been running for ``migrate - t_k``
  at the guest's steady rate before the migration (median pass time of the lines before
  it): that fraction of it was done before the window;
* the pass in progress at STOP was finished by the destination, which runs without a
  dirty log at its own steady rate (median of its next pass times): the time it spent on
  it after RESUME says how much of that pass was left, the rest was done in the window.

Speeds within a pass are not assumed uniform across the migration (the source's guest
stalls on write faults exactly then): only the parts run at a measured steady speed are
converted from time to work.

Two figures are built on the same stamps. :func:`progress_at` reads the guest's progress
at any second of its window, so both engines' guests can be compared over the same
seconds from ``migrate`` (``guest/Q``, :func:`hv.bench.migrate_table.same_span_progress`).
:func:`first_second_passes` counts the destination guest's passes in its first second
after RESUME (its own part of the pass in progress at RESUME, as :func:`guest_curve`
leaves it to the destination, then linear between its lines), to set against the
guest's full speed (:func:`full_speed_pass_s`).
"""
from __future__ import annotations

import re
import statistics
import threading
import time
from pathlib import Path

POLL_S = 0.002            # how often LineClock reads the consoles
FIRST_SECOND_S = 1.0      # the destination's first second after RESUME
# Pass lines the source prints before ``migrate``: their median gap is the guest's steady
# pass time. Three (two gaps) let one slow pass on a busy host set it (a 53 ms "steady"
# pass beside 15-16 ms ones made one destination look 3x faster than steady).
STEADY_LINES = 12
PASS_START = re.compile(rb"(?m)^pass \d")


def _median_gap(times: list[float]) -> float | None:
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
    return statistics.median(gaps) if gaps else None


def guest_curve(source: list[float], destination: list[float], migrate_at: float, stop: float,
                resume: float) -> list[tuple[float, float]] | None:
    """The guest's cumulative progress through the window: (seconds since ``migrate_at``,
    passes done since then) at the window's start, at each source pass line in it and at
    ``stop``; linear in between (within a pass the guest runs at about one speed: its
    full speed, or the speed at which it gets through write faults).

    ``source`` / ``destination``: the times at which each pass line appeared on that
    console, in order. None when there is too little to measure with: fewer than two
    source lines before the window (no steady rate) or fewer than two destination lines
    (no steady rate after the switch-over)."""
    before = [t for t in source if t <= migrate_at]
    source_pass = steady_pass_s(source, migrate_at)
    destination_pass = _median_gap(destination)
    if source_pass is None or destination_pass is None or stop < migrate_at:
        return None
    done_before = min(1.0, (migrate_at - before[-1]) / source_pass)
    inside = [t for t in source if migrate_at < t <= stop]
    curve = [(0.0, 0.0)] + [(t - migrate_at, n + 1 - done_before) for n, t in enumerate(inside)]
    left_after = _left_at_resume(destination, resume, destination_pass)
    curve.append((stop - migrate_at, max(0.0, len(inside) - done_before + (1.0 - left_after))))
    return curve


def guest_progress(source: list[float], destination: list[float], migrate_at: float, stop: float,
                   resume: float) -> float | None:
    """Passes (fractional) the guest completed between ``migrate_at`` and ``stop`` (the
    end of :func:`guest_curve`)."""
    curve = guest_curve(source, destination, migrate_at, stop, resume)
    return None if curve is None else curve[-1][1]


def progress_at(curve: list[tuple[float, float]], elapsed: float) -> float:
    """Passes done in the first ``elapsed`` seconds of the window (linear between the
    curve's points; the whole window's progress beyond its end)."""
    previous = curve[0]
    for point in curve[1:]:
        if elapsed <= point[0]:
            span = point[0] - previous[0]
            share = (elapsed - previous[0]) / span if span > 0 else 1.0
            return previous[1] + max(0.0, share) * (point[1] - previous[1])
        previous = point
    return curve[-1][1]


def steady_pass_s(source: list[float], migrate_at: float) -> float | None:
    """The guest's steady pass time before the migration: the median gap between the
    source's pass lines stamped before ``migrate_at`` (None with fewer than two)."""
    return _median_gap([t for t in source if t <= migrate_at])


def _left_at_resume(destination: list[float], resume: float, destination_pass: float) -> float:
    """The part of the pass in progress at RESUME that the destination ran: the time to
    its first line at its steady pass time (median gap of its lines), at most one pass."""
    return min(1.0, max(0.0, destination[0] - resume) / destination_pass)


def destination_curve(destination: list[float], resume: float) -> list[tuple[float, float]] | None:
    """The destination guest's cumulative progress from ``resume``: (seconds since
    RESUME, passes done since) at RESUME and at each of its pass lines, linear in between.
    The pass in progress at RESUME counts for the part :func:`guest_curve` leaves to the
    destination (whatever the source did of it is not the destination's work). None with
    fewer than two destination lines."""
    destination_pass = _median_gap(destination)
    if destination_pass is None:
        return None
    first = _left_at_resume(destination, resume, destination_pass)
    return [(0.0, 0.0)] + [(max(0.0, t - resume), first + n) for n, t in enumerate(destination)]


def first_second_passes(destination: list[float], resume: float, seconds: float = 1.0) -> float | None:
    """Passes the destination guest did in its first ``seconds`` after RESUME (linear
    between its pass lines, :func:`destination_curve`). None unless a destination line
    was stamped at or after ``resume + seconds``: the span must be measured, not
    extrapolated."""
    curve = destination_curve(destination, resume)
    if curve is None or curve[-1][0] < seconds:
        return None
    return progress_at(curve, seconds)


def later_pass_s(destination: list[float], resume: float, seconds: float = FIRST_SECOND_S) -> float | None:
    """The destination guest's pass time in the second after its first (median gap of its
    lines from ``resume + seconds`` to ``resume + 2 * seconds``; None with fewer than two
    there). The other measure of its full speed: the steady rate before ``migrate`` was
    taken a second or more earlier, and on a shared host the load can change by then."""
    return _median_gap([t for t in destination if resume + seconds <= t <= resume + 2 * seconds])


def full_speed_pass_s(steady: float | None, later: float | None) -> float | None:
    """The guest's pass time at full speed: the shorter of its steady pass time before
    ``migrate`` and the destination's in its second second. A destination slow for good
    is judged by the first, a steady rate taken during a busy moment is corrected by the
    second, and a figure over 1.0 cannot come from load alone."""
    known = [t for t in (steady, later) if t]
    return min(known) if known else None


def guest_lost(source: list[float], migrate_at: float, stop: float, progress: float | None) -> float | None:
    """Seconds of the window ``migrate_at`` .. ``stop`` the guest did not turn into work:
    the window minus the time its ``progress`` takes at the guest's own steady pass rate
    before the migration. Unlike passes per second this does not depend on how long the
    migration lasted, so it compares a 0.1 s migration with a 1 s one fairly: what the
    migration cost the guest while it ran (the pause is the downtime column)."""
    steady = steady_pass_s(source, migrate_at)
    if steady is None or progress is None:
        return None
    return max(0.0, (stop - migrate_at) - progress * steady)


class LineClock:
    """Stamps (wall clock, as QMP event timestamps) the pass lines of two serial files as
    they appear, in a thread, until :meth:`stop`. Only new bytes are read at each poll."""

    def __init__(self, source: Path, destination: Path) -> None:
        self._paths = (source, destination)
        self.times: tuple[list[float], list[float]] = ([], [])
        self._offsets = [0, 0]
        self._tails = [b"\n", b"\n"]   # the unfinished line carried to the next poll
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="line-clock", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def wait_destination(self, lines: int, timeout: float, after: float = 0.0) -> None:
        """Until the destination printed ``lines`` pass lines, one of them stamped after
        ``after`` (wall clock), or ``timeout`` s passed."""
        deadline = time.monotonic() + timeout
        while ((len(self.times[1]) < lines or not self.times[1] or self.times[1][-1] <= after)
               and time.monotonic() < deadline and self._thread.is_alive()):
            time.sleep(0.01)

    def _run(self) -> None:
        while not self._stopped.wait(POLL_S):
            now = time.time()
            for index in (0, 1):
                self._poll(index, now)

    def _poll(self, index: int, now: float) -> None:
        try:
            with open(self._paths[index], "rb") as file:
                file.seek(self._offsets[index])
                new = file.read()
        except OSError:
            return
        if not new:
            return
        self._offsets[index] += len(new)
        tail = self._tails[index]
        text = tail + new
        # A pass line counts once its start ("pass N") is there. The unfinished last line
        # is carried over (from its newline, so ^ still anchors it): a start that was
        # already whole in it was counted at an earlier poll.
        self.times[index].extend(now for match in PASS_START.finditer(text) if match.end() > len(tail))
        self._tails[index] = text[text.rfind(b"\n"):]
