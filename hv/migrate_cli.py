"""``hv migrate --qmp SOCKET URI``: start a live migration and follow it to the end.

For the person (or the CI job) running it. It sets the parameters given on the command
line (``migrate-set-parameters``), sends ``migrate``, then polls ``query-migrate`` every
``--interval`` seconds and listens to the monitor's events meanwhile (a ``MIGRATION``
status change is shown at once, ``MIGRATION_NOT_CONVERGING`` as a warning).

On a terminal the progress is one line redrawn in place (``\\r`` + erase to end of line,
cut to the terminal width so it never wraps); warnings and the result get lines of
their own. Anywhere else (a log, a pipe) every update is one plain ``key=value`` line.

Exit status: 0 when the migration completed; 1 when it failed or was canceled (the reason,
``error-desc``, is on stderr as ``hv: error: ...``) or the monitor cannot be used; 130
after Ctrl-C, which cancels the migration (``migrate_cancel``), waits until the source
says ``canceled`` (its guest then runs on) and says so.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from hv.errors import ConfigError
from hv.qmp.address import QmpAddressError
from hv.qmp.client import QmpClientError, QmpConnection, parse_target
from hv.textsafe import printable

__all__ = ["Progress", "format_progress", "main"]

log = logging.getLogger(__name__)

PROG = "hv migrate"
EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
TERMINAL_STATES = ("completed", "failed", "canceled")
CANCEL_WAIT = 60.0  # seconds to wait for 'canceled' after migrate_cancel
_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class _UsageError(ConfigError):
    """The command line is wrong."""


def parse_size(text: str) -> int:
    """Bytes/s as an integer with an optional K, M or G suffix (powers of 1024)."""
    number, suffix = text.rstrip("kKmMgGiIbB/s"), text[len(text.rstrip("kKmMgGiIbB/s")):]
    unit = suffix[:1].lower()
    if unit not in _SUFFIXES or not number.isdigit() or not number.isascii():
        raise _UsageError(f"bad bandwidth {text!r} (bytes/s, e.g. 1048576, 512K, 100M)")
    return int(number) * _SUFFIXES[unit]


# -- what a person sees -------------------------------------------------------------------------
def _mib(value: float) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{int(value // 60)} min {int(value % 60)} s"
    return f"{value:.0f} s"


@dataclass
class Progress:
    """The numbers of one ``query-migrate`` answer that the progress view shows."""

    status: str
    percent: float = 0.0
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    mb_per_s: float = 0.0
    dirty_mb_per_s: float = 0.0
    pass_number: int = 0
    throttle: int = 0
    expected_downtime_ms: int = 0
    eta_s: float | None = None
    converging: bool | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_qmp(cls, info: dict[str, Any]) -> Progress:
        """Read a ``query-migrate`` return value; missing or odd fields count as zero
        (the monitor may be an older hv, or QEMU)."""
        raw_ram = info.get("ram")
        ram: dict[str, Any] = raw_ram if isinstance(raw_ram, dict) else {}

        def num(source: dict[str, Any], key: str) -> float:
            value = source.get(key, 0)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

        total, remaining = int(num(ram, "total")), int(num(ram, "remaining"))
        mbps = num(ram, "mbps")
        page_size = int(num(ram, "page-size")) or 4096
        bytes_per_s = mbps * 1e6 / 8
        converging = info.get("converging")
        return cls(
            status=printable(str(info.get("status", "?"))),
            percent=100.0 * (total - remaining) / total if total else 0.0,
            transferred=int(num(ram, "transferred")), remaining=remaining, total=total,
            mb_per_s=bytes_per_s / 1e6, dirty_mb_per_s=num(ram, "dirty-pages-rate") * page_size / 1e6,
            pass_number=int(num(ram, "dirty-sync-count")) + 1, throttle=int(num(info, "cpu-throttle-percentage")),
            expected_downtime_ms=int(num(info, "expected-downtime")),
            eta_s=remaining / bytes_per_s if bytes_per_s > 0 and remaining else None,
            converging=converging if isinstance(converging, bool) else None)


def format_progress(p: Progress, plain: bool) -> str:
    """One progress line: human words for a terminal, ``key=value`` for a log."""
    eta = "?" if p.eta_s is None else _seconds(p.eta_s)
    if plain:
        return (f"migrate: status={p.status} ram={p.percent:.1f}% transferred={p.transferred} "
                f"remaining={p.remaining} total={p.total} speed={p.mb_per_s:.1f}MB/s "
                f"dirty={p.dirty_mb_per_s:.1f}MB/s pass={p.pass_number} throttle={p.throttle}% "
                f"expected-downtime={p.expected_downtime_ms}ms eta={eta.replace(' ', '')}")
    return (f"{p.status} {p.percent:5.1f}%  sent {_mib(p.transferred)}, left {_mib(p.remaining)}  "
            f"{p.mb_per_s:.1f} MB/s  dirty {p.dirty_mb_per_s:.1f} MB/s  pass {p.pass_number}  "
            f"throttle {p.throttle}%  downtime ~{p.expected_downtime_ms} ms  ETA {eta}")


def not_converging_text(p: Progress) -> str:
    return (f"warning: migration not converging: the guest dirties {p.dirty_mb_per_s:.1f} MB/s, "
            f"the link sends {p.mb_per_s:.1f} MB/s (pass {p.pass_number}, throttle {p.throttle}%); "
            "raise --max-bandwidth or --downtime-limit, or let auto-converge throttle harder")


class Display:
    """Where progress goes: a line redrawn in place on a terminal, plain lines elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._drawn = False  # a progress line is on screen (terminal only)
        self._last_plain = ""

    def _width(self) -> int:
        """Columns of the terminal (80 when it does not say: a pty nobody sized)."""
        try:
            columns = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError):
            columns = shutil.get_terminal_size().columns
        return columns or 80

    def progress(self, p: Progress) -> None:
        if self.tty:
            line = format_progress(p, plain=False)[: max(self._width() - 1, 20)]
            self.out.write(f"\r\x1b[K{line}")
            self._drawn = True
        else:
            line = format_progress(p, plain=True)
            if line == self._last_plain:
                return  # nothing moved: no duplicate line in the log
            self._last_plain = line
            self.out.write(line + "\n")
        self.out.flush()

    def end_line(self) -> None:
        """Leave the progress line as it is and move below it (before an error line)."""
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()
        self._drawn = False

    def line(self, text: str) -> None:
        """A line of its own (a warning, the result), above the progress line."""
        if self.tty and self._drawn:
            self.out.write("\r\x1b[K")
        self.out.write(text + "\n")
        self._drawn = False
        self.out.flush()


# -- following a migration ----------------------------------------------------------------------
class Follower:
    """Polls ``query-migrate`` and reads events until the migration ends."""

    def __init__(self, connection: QmpConnection, display: Display, interval: float) -> None:
        self.connection = connection
        self.display = display
        self.interval = interval
        self._warned = False

    def run(self) -> dict[str, Any]:
        """Follow until a terminal status; its ``query-migrate`` answer."""
        while True:
            info = self.query()
            progress = Progress.from_qmp(info)
            if progress.status in TERMINAL_STATES:
                return info
            self.display.progress(progress)
            self._convergence(progress)
            self._wait()

    def query(self) -> dict[str, Any]:
        reply = self.connection.execute("query-migrate")
        if "return" not in reply or not isinstance(reply["return"], dict):
            raise QmpClientError(f"query-migrate failed: {printable(str(reply.get('error', reply)))}")
        return reply["return"]

    def _convergence(self, p: Progress) -> None:
        if p.converging is False and not self._warned:
            self._warned = True
            self.display.line(not_converging_text(p))
        elif p.converging is True and self._warned:
            self._warned = False
            self.display.line(f"migration converging again (pass {p.pass_number})")

    def _wait(self) -> None:
        """Sleep one interval, but wake at once when the migration's status changes."""
        deadline = time.monotonic() + self.interval
        while (left := deadline - time.monotonic()) > 0:
            event = self.connection.next_event(left)
            if event is None:
                return
            name = event.get("event")
            if name == "MIGRATION":
                return
            if name == "MIGRATION_NOT_CONVERGING" and not self._warned:
                return  # query now: the warning shows the current numbers


def _result(info: dict[str, Any], display: Display) -> int:
    status = printable(str(info.get("status")))
    total_s = info.get("total-time", 0) / 1000 if isinstance(info.get("total-time"), int) else 0.0
    p = Progress.from_qmp(info)
    if status == "completed":
        display.line(f"migration completed in {total_s:.1f} s: {_mib(p.transferred)} sent, "
                     f"downtime {info.get('downtime', '?')} ms")
        return EXIT_COMPLETED
    if status == "canceled":
        display.line("migration canceled; the VM runs on at the source")
        print(f"hv: error: migration canceled after {total_s:.1f} s", file=sys.stderr)
        return EXIT_FAILED
    desc = printable(str(info.get("error-desc", "no reason given")))
    display.line(f"migration failed after {total_s:.1f} s: {desc}")
    print(f"hv: error: migration failed: {desc}", file=sys.stderr)
    return EXIT_FAILED


def _cancel(target: Any, display: Display, timeout: float) -> int:
    """Ctrl-C: cancel on a fresh connection (the old one may hold half a reply), wait
    until the source says the migration ended, and say how."""
    display.line("interrupted: canceling the migration (migrate_cancel) ...")
    with QmpConnection(target, timeout=timeout) as connection:
        connection.execute("qmp_capabilities")
        reply = connection.execute("migrate_cancel")
        follower = Follower(connection, display, 0.2)
        deadline = time.monotonic() + CANCEL_WAIT
        info = follower.query()
        while info.get("status") not in TERMINAL_STATES:
            if time.monotonic() > deadline:
                raise QmpClientError(f"the migration did not end within {CANCEL_WAIT:g} s of migrate_cancel")
            follower._wait()
            info = follower.query()
    if info.get("status") != "canceled":
        if "error" in reply:
            log.debug("migrate_cancel: %s", reply["error"])
        return _result(info, display)  # it ended some other way before the cancel
    display.line("migration canceled by Ctrl-C; the VM runs on at the source")
    print("hv: error: migration canceled (interrupted)", file=sys.stderr)
    return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Start a live migration on the VM behind a QMP socket and follow it to the end.")
    parser.add_argument("--qmp", required=True, metavar="SOCKET",
                        help="the source VM's QMP socket: a path, unix:PATH or tcp:HOST:PORT")
    parser.add_argument("uri", help="where to: tcp:HOST:PORT, unix:PATH or file:DIR")
    parser.add_argument("--max-bandwidth", metavar="B", help="bytes/s, K/M/G suffixes allowed (0: unlimited)")
    parser.add_argument("--downtime-limit", type=int, metavar="MS", help="longest pause of the guest, in ms")
    parser.add_argument("--stall-timeout", type=int, metavar="S",
                        help="fail when the destination makes no progress for S seconds (x-stall-timeout)")
    parser.add_argument("--channels", type=int, metavar="N",
                        help="connections for the full pass, 1-8 (multifd-channels; the destination "
                        "takes up to its own value; default 2)")
    parser.add_argument("--interval", type=float, default=0.5, metavar="S",
                        help="seconds between progress updates (default 0.5)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for each monitor reply (default 10)")
    return parser


def _parameters(options: argparse.Namespace) -> dict[str, int]:
    params: dict[str, int] = {}
    if options.max_bandwidth is not None:
        params["max-bandwidth"] = parse_size(options.max_bandwidth)
    if options.downtime_limit is not None:
        params["downtime-limit"] = options.downtime_limit
    if options.stall_timeout is not None:
        params["x-stall-timeout"] = options.stall_timeout
    if options.channels is not None:
        params["multifd-channels"] = options.channels
    if not 0 < options.interval <= 3600 or not 0 < options.timeout <= 3600:
        raise _UsageError("--interval and --timeout must be between 0 and 3600 seconds")
    return params


def _start(connection: QmpConnection, uri: str, params: dict[str, int]) -> dict[str, Any] | None:
    """Set the parameters and send migrate; None when it started, else the error."""
    connection.execute("qmp_capabilities")
    if params:
        reply = connection.execute("migrate-set-parameters", params)
        if "error" in reply:
            return reply["error"]
    reply = connection.execute("migrate", {"uri": uri})
    return reply.get("error")


def main(argv: Sequence[str] | None = None) -> int:
    """``hv migrate``; see the module docstring for what it shows and its exit status."""
    try:
        options = _parser().parse_args(argv)
    except SystemExit as exc:  # --help exits 0; usage errors exit 2 after argparse's message
        return 0 if exc.code in (0, None) else EXIT_FAILED
    try:
        target = parse_target(options.qmp)
        params = _parameters(options)
    except (QmpAddressError, _UsageError) as exc:
        print(f"hv: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    display = Display(sys.stdout)
    try:
        with QmpConnection(target, timeout=options.timeout) as connection:
            try:
                error = _start(connection, options.uri, params)
                if error is not None:  # e.g. a refused connection: query-migrate says the same
                    desc = printable(str(error.get("desc", error)))
                    display.line(f"migration failed: {desc}")
                    print(f"hv: error: migration failed: {desc}", file=sys.stderr)
                    return EXIT_FAILED
                info = Follower(connection, display, options.interval).run()
            except KeyboardInterrupt:
                return _cancel(target, display, options.timeout)
        return _result(info, display)
    except KeyboardInterrupt:
        print("hv: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except QmpClientError as exc:
        display.end_line()
        print(f"hv: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
