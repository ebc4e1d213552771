"""What ``hv bench migrate`` measures per migration and how the table prints it.

The figures (columns explained in :mod:`hv.bench.migrate` and the README):

* ``total ms``: the source's ``query-migrate`` ``total-time``;
* ``down ms``: from the source's ``STOP`` event to the destination's ``RESUME`` event
  (the events' own timestamps, one host wall clock), the same method for hv and QEMU;
  ``own down`` is what each engine's ``query-migrate`` calls downtime (hv counts until
  the destination confirms, QEMU stops at its last byte: information only);
* ``guest p/s``: the dirty guest's passes per second while it migrates (passes done
  between the ``migrate`` command and the source's ``STOP`` event, to a fraction of a pass
  from the pass lines' times: :mod:`hv.bench.migrate_progress`; over that time, pooled
  over the runs): information, each engine over its own window;
* ``span p/s``, ``guest/Q``: both guests' passes per second over the same seconds: for
  each pair of runs (hv's and QEMU's of one repetition, run back to back) the first
  min(both windows) seconds after ``migrate``, both guests still migrating, pooled over
  the pairs (:func:`same_span_progress`); ``guest/Q`` is hv's over QEMU's and the goal.
  Over whole windows a 5x longer migration whose guest got past the dirty log's
  first-write stall counts its later full-speed seconds, so each engine's own-window rate
  follows the other's window length, not how it treats the guest;
* destination's first second (below the table): the passes the destination's guest did
  in its first second after ``RESUME`` over the passes it does in a second at full speed
  (the shorter of its steady pass time before ``migrate`` and the destination's pass
  time in its second second: :func:`hv.bench.migrate_progress.full_speed_pass_s`),
  pooled over the runs, hv and QEMU;
* ``broken``: migrations whose destination did not carry on where the source stopped;
* ``src+ MiB``, ``dst+ MiB``: each process's peak RSS (VmHWM) minus the resident part of
  its guest-RAM mappings (:func:`hv.bench.common.parse_memory`), read from ``/proc`` at
  the end of the run (source once the migration completed, destination once it carried
  on): what the VMM needed beyond the guest RAM the guest touched; ``mem/Q`` is hv's
  sum of the two over QEMU's.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from hv.bench.common import size_text
from hv.bench.migrate_progress import progress_at

MIB = 1 << 20
DOWNTIME_LIMIT_MS = 300
GUEST_PROGRESS_GOAL = 0.8          # hv's guest progress while migrating / QEMU's, same seconds
FIRST_SECOND_GOAL = 0.8            # the destination's first second / the guest's full speed
QEMU_ACCEL = {"kvm": "kvm", "unicorn": "tcg"}   # hv's accelerator -> QEMU's like-for-like one


@dataclass(frozen=True)
class Case:
    engine: str       # "hv" or "qemu"
    accel: str        # kvm / unicorn (hv), kvm / tcg (qemu)
    size_mib: int
    mode: str         # idle / dirty
    transport: str    # tcp / unix
    tls: bool = False  # the same migration over TLS

    @property
    def link(self) -> str:
        return f"{self.transport}+tls" if self.tls else self.transport

    def label(self) -> str:
        return f"{self.engine} {self.accel} {size_text(self.size_mib)} {self.mode} {self.link}"

    def reference(self) -> Case | None:
        """QEMU's like-for-like case of an hv case (TCG for Unicorn, KVM for KVM)."""
        if self.engine != "hv":
            return None
        return dataclasses.replace(self, engine="qemu", accel=QEMU_ACCEL[self.accel])


@dataclass(frozen=True)
class Sample:
    total_ms: float
    downtime_ms: float            # STOP event (source) -> RESUME event (destination)
    transferred: int
    passes: int                   # ram.dirty-sync-count
    own_downtime_ms: float = 0.0  # the engine's own query-migrate "downtime"
    # dirty guest: passes (fractional, hv.bench.migrate_progress) done between migrate and STOP
    guest_passes: float | None = None
    window_s: float = 0.0         # from the migrate command to the source's STOP event
    broken: str = ""              # why the destination did not continue ("" = it did)
    guest_lost_s: float | None = None  # window minus the work done at the guest's steady rate
    # (seconds since migrate, passes done since) through the window: hv.bench.migrate_progress
    guest_curve: tuple[tuple[float, float], ...] | None = None
    src_extra: int | None = None  # bytes: source's peak RSS beyond its resident guest RAM
    dst_extra: int | None = None  # the same for the destination
    run: int = -1                 # the repetition (pairs hv's run with QEMU's); -1: by position
    full_speed_pass_s: float | None = None  # the guest's pass time at full speed (migrate_progress)
    first_second_passes: float | None = None  # the destination's passes in its first second
    # the raw loopback rate (bytes/s) over the migration's transport right before its
    # migrate command and right after it completed, both VMs up (0: not measured)
    raw_before: float = 0.0
    raw_after: float = 0.0

    @property
    def guest_rate(self) -> float | None:
        """The dirty guest's passes per second while migrating (None: idle guest)."""
        return None if self.guest_passes is None else self.guest_passes / max(self.window_s, 1e-3)

    @property
    def throughput(self) -> float:
        """Bytes per second on the wire over the whole migration."""
        return self.transferred / max(self.total_ms, 1) * 1000


@dataclass
class Row:
    case: Case
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(s, attribute) for s in self.samples)

    def guest_rate(self) -> float | None:
        """Passes over seconds pooled over all runs: a short migration sees 0 or 1 whole
        passes, so a median of per-run rates would be quantized; the pooled ratio is not."""
        counted = [s for s in self.samples if s.guest_passes is not None]
        if not counted:
            return None
        return sum(s.guest_passes or 0 for s in counted) / max(sum(s.window_s for s in counted), 1e-3)

    def first_second(self) -> float | None:
        """The destination's guest in its first second after RESUME as a fraction of the
        guest's full speed, pooled over the runs: passes done over passes a guest at full
        speed would have done (one second / full-speed pass time, per run)."""
        counted = [s for s in self.samples if s.first_second_passes is not None and s.full_speed_pass_s]
        if not counted:
            return None
        return (sum(s.first_second_passes or 0.0 for s in counted)
                / sum(1.0 / (s.full_speed_pass_s or 1.0) for s in counted))

    def broken(self) -> int:
        return sum(bool(s.broken) for s in self.samples)

    def memory(self, attribute: str) -> float | None:
        """Median of ``src_extra`` / ``dst_extra`` (or another optional figure) over the
        runs that could measure it."""
        values = [getattr(s, attribute) for s in self.samples if getattr(s, attribute) is not None]
        return statistics.median(values) if values else None

    def memory_total(self) -> float | None:
        src, dst = self.memory("src_extra"), self.memory("dst_extra")
        return None if src is None or dst is None else src + dst


def _fmt_mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(mine: float | None, reference: float | None) -> float | None:
    return None if mine is None or not reference else mine / reference


HEADER = ("engine", "accel", "size", "mode", "link", "total ms", "down ms", "own down", "sent MiB", "syncs",
          "MiB/s", "% raw", "guest p/s", "span p/s", "total/Q", "down/Q", "guest/Q", "src+ MiB", "dst+ MiB",
          "mem/Q", "broken", "goals")


def verdict(row: Row, down: float, total_ratio: float | None, down_ratio: float | None,
            guest_ratio: float | None, memory_ratio: float | None = None) -> str:
    """The goals an hv row can meet: downtime <= 300 ms and <= QEMU's, total <= QEMU's,
    guest progress >= 0.8 of QEMU's over the same seconds, memory beyond guest RAM <=
    QEMU's, the destination's guest >= 0.8 of its full speed in its first second; a
    broken guest is always a miss."""
    missed = []
    first = row.first_second()
    if down > DOWNTIME_LIMIT_MS or (down_ratio or 0) > 1:
        missed.append("down")
    if (total_ratio or 0) > 1:
        missed.append("total")
    if guest_ratio is not None and guest_ratio < GUEST_PROGRESS_GOAL:
        missed.append("guest")
    if (memory_ratio or 0) > 1:
        missed.append("mem")
    if first is not None and first < FIRST_SECOND_GOAL:
        missed.append("dst")
    if row.broken():
        missed.append("BROKEN")
    return ",".join(missed) + " missed" if missed else "ok"


def row_cells(row: Row, ref: Row | None, raw: dict[str, float],
              span: tuple[float, float, float] | None = None) -> tuple[str, ...]:
    """One table line. ``span``: (seconds, hv passes, QEMU passes) over the same seconds
    from :func:`same_span_progress` for the hv row and its QEMU twin (each row prints its
    own engine's passes)."""
    c = row.case
    base = (c.engine, c.accel, size_text(c.size_mib), c.mode, c.link)
    if not row.samples:
        return base + ("failed: " + (row.errors[-1] if row.errors else "?"),)
    total, down = row.median("total_ms"), row.median("downtime_ms")
    rate, guest = row.median("throughput"), row.guest_rate()
    fraction = rate / raw[c.transport] if raw.get(c.transport) else None
    total_ratio = _ratio(total, ref.median("total_ms")) if ref else None
    down_ratio = _ratio(down, ref.median("downtime_ms")) if ref else None
    mine = 1 if c.engine == "hv" else 2
    span_rate = span[mine] / span[0] if span and span[0] > 0 else None
    guest_ratio = _ratio(span[1], span[2]) if span and ref else None
    memory_ratio = _ratio(row.memory_total(), ref.memory_total()) if ref else None
    goals = verdict(row, down, total_ratio, down_ratio, guest_ratio, memory_ratio) if c.engine == "hv" else ""
    partial = f" ({len(row.samples)}/{len(row.samples) + len(row.errors)} ok)" if row.errors else ""
    return base + (f"{total:.0f}", f"{down:.0f}", f"{row.median('own_downtime_ms'):.0f}",
                   f"{row.median('transferred') / MIB:.1f}", f"{row.median('passes'):.0f}", f"{rate / MIB:.0f}",
                   "-" if fraction is None else f"{fraction * 100:.0f}%",
                   "-" if guest is None else f"{guest:.1f}", "-" if span_rate is None else f"{span_rate:.1f}",
                   _fmt_ratio(total_ratio), _fmt_ratio(down_ratio), _fmt_ratio(guest_ratio),
                   _fmt_mib(row.memory("src_extra")), _fmt_mib(row.memory("dst_extra")), _fmt_ratio(memory_ratio),
                   f"{row.broken()}/{len(row.samples)}", goals + partial)


def format_table(rows: Iterable[Row], raw: dict[str, float]) -> str:
    rows = list(rows)
    measured = {r.case: r for r in rows if r.samples}
    spans = same_spans(rows, measured)
    lines: list[tuple[str, ...]] = [HEADER]
    for row in rows:
        twin = row.case.reference()
        lines.append(row_cells(row, measured.get(twin) if twin else None, raw, spans.get(row.case)))
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(HEADER))]
    out = []
    for line in lines:
        cells = [cell.rjust(widths[i]) if 5 <= i < len(HEADER) - 1 and len(line) == len(HEADER)
                 else cell.ljust(widths[i]) for i, cell in enumerate(line)]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "-" * len(out[0]))
    out.extend(tls_lines(rows))
    out.extend(lost_lines(rows, measured, spans))
    out.extend(broken_lines(rows))
    raw_text = ", ".join(f"{t} {rate / MIB:.0f} MiB/s" for t, rate in raw.items())
    out.append("raw loopback (RAM -> pre-faulted RAM, 1 MiB sendall/recv_into, median of those right before and "
               f"right after each migration): {raw_text}")
    out.append("medians; down ms = source STOP event -> destination RESUME event (both engines); own down = "
               "the engine's query-migrate downtime; MiB/s = transferred / total time; guest p/s = guest passes/s "
               "while migrating, each engine over its own window (all runs pooled, information);\n"
               "span p/s = guest passes/s over the same seconds from migrate for hv and QEMU (each run pair's "
               "shorter window, pooled), guest/Q = hv's span p/s / QEMU's;\n"
               "x/Q = hv / QEMU (unicorn vs tcg, kvm vs kvm); src+/dst+ MiB = peak RSS (VmHWM) beyond the resident "
               "guest RAM, mem/Q = hv's src+dst over QEMU's; broken = broken/completed")
    out.append(f"goals (hv rows): down <= {DOWNTIME_LIMIT_MS} ms and <= QEMU, total <= QEMU, guest/Q >= "
               f"{GUEST_PROGRESS_GOAL}, mem/Q <= 1, destination's first second >= {FIRST_SECOND_GOAL} of full "
               f"speed (dst), no broken guest (% raw and guest p/s are information, not goals)")
    return "\n".join(out)


def same_spans(rows: list[Row], measured: dict[Case, Row]) -> dict[Case, tuple[float, float, float]]:
    """:func:`same_span_progress` of every hv row with a measured QEMU twin, under both
    rows' cases (the QEMU row prints its side of the pair)."""
    spans = {}
    for row in rows:
        twin = row.case.reference()
        reference = measured.get(twin) if twin is not None and row.samples else None
        span = same_span_progress(row, reference) if reference is not None else None
        if span is not None and twin is not None:
            spans[row.case] = spans[twin] = span
    return spans


def tls_lines(rows: list[Row]) -> list[str]:
    """One line per TLS row whose plain twin has samples: both rates and their ratio, for
    hv and QEMU alike."""
    plain = {dataclasses.replace(r.case, tls=False): r for r in rows if not r.case.tls and r.samples}
    lines = []
    for row in rows:
        twin = plain.get(dataclasses.replace(row.case, tls=False)) if row.case.tls and row.samples else None
        if twin is not None:
            tls_rate, plain_rate = row.median("throughput"), twin.median("throughput")
            lines.append(f"tls/plain {twin.case.label()}: {tls_rate / MIB:.0f} vs {plain_rate / MIB:.0f} MiB/s "
                         f"({tls_rate / plain_rate:.2f})")
    return lines


def lost_lines(rows: list[Row], measured: dict[Case, Row],
               spans: dict[Case, tuple[float, float, float]]) -> list[str]:
    """Per hv dirty row: the guest time each engine's migration cost the guest while it
    ran (window minus work done at the guest's own steady rate, median; information),
    both guests' passes over the same seconds (what guest/Q divides: ``spans``, from
    :func:`same_spans`), and the destination's first second after RESUME against the
    guest's full speed."""
    lines = []
    for row in rows:
        twin = row.case.reference()
        if twin is None or not row.samples:
            continue
        reference = measured.get(twin)
        mine = row.memory("guest_lost_s")
        theirs = reference.memory("guest_lost_s") if reference is not None else None
        if mine is not None and theirs is not None:
            lines.append(f"guest time lost while migrating, {row.case.label()}: hv {mine * 1000:.0f} ms, "
                         f"QEMU {theirs * 1000:.0f} ms ({_fmt_ratio(_ratio(mine, theirs))})")
        span = spans.get(row.case)
        if span is not None:
            seconds, hv, qemu = span
            lines.append(f"guest passes in the same time from migrate ({seconds * 1000:.0f} ms over the run pairs), "
                         f"{row.case.label()}: hv {hv:.2f}, QEMU {qemu:.2f} ({_fmt_ratio(_ratio(hv, qemu))})")
        first = row.first_second()
        if first is not None:
            theirs = reference.first_second() if reference is not None else None
            qemu_text = "" if theirs is None else f", QEMU {theirs:.2f}"
            lines.append(f"destination's first second after RESUME, {row.case.label()}: hv {first:.2f} of the "
                         f"guest's full speed{qemu_text}")
    return lines


def same_span_progress(row: Row, reference: Row) -> tuple[float, float, float] | None:
    """Both engines' guest progress over the same seconds: for each pair of runs (hv's and
    QEMU's of one repetition, run back to back), the passes each guest did in the first
    min(both windows) seconds after ``migrate``, summed, with the seconds summed: (seconds,
    hv passes, QEMU passes). Both guests were still migrating all through each span. Runs
    pair by ``Sample.run`` (a failed run leaves no sample, so positions would pair runs of
    different repetitions), by position where it is unset. Per whole window a longer
    migration whose guest got past the write-fault stall of its first round looks better
    per second; over the same seconds both engines are in the same phase."""
    theirs = {_run_key(s, i): s for i, s in enumerate(reference.samples)}
    pairs = []
    for index, sample in enumerate(row.samples):
        twin = theirs.get(_run_key(sample, index))
        if twin is not None and sample.guest_curve and twin.guest_curve:
            pairs.append((sample.guest_curve, twin.guest_curve, min(sample.window_s, twin.window_s)))
    if not pairs:
        return None
    return (sum(span for _, _, span in pairs),
            sum(progress_at(list(a), span) for a, _, span in pairs),
            sum(progress_at(list(b), span) for _, b, span in pairs))


def _run_key(sample: Sample, index: int) -> int:
    return sample.run if sample.run >= 0 else index


def broken_lines(rows: list[Row]) -> list[str]:
    """Broken guests per engine, with the first reason of each row that had one."""
    lines = []
    for engine in ("hv", "qemu"):
        mine = [r for r in rows if r.case.engine == engine and r.samples]
        if mine:
            count, total = sum(r.broken() for r in mine), sum(len(r.samples) for r in mine)
            lines.append(f"broken guests, {engine}: {count} of {total} migrations")
            for row in mine:
                reason = next((s.broken for s in row.samples if s.broken), "")
                if reason:
                    lines.append(f"  {row.case.label()}: {reason}")
    return lines
