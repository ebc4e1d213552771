"""``hv bench migrate``: the live-migration benchmark (issue 4), hv against QEMU.

For every combination of guest size, guest mode, transport and accelerator it starts a
source and a destination hv process on the ``dirty`` fixture guest, migrates once, and
reads the source's ``query-migrate`` statistics; each combination runs ``--repeat``
times and the table shows medians. Where ``qemu-system-x86_64`` is installed the same
guests are migrated by QEMU in the same run (KVM when usable, else TCG), and hv/QEMU
ratios are printed. The raw loopback socket rate (1 MiB ``sendall`` / ``recv_into``
between two threads) is measured for each transport in the same run, so a throughput
can be read as a fraction of what the link can do on this machine, now.

Guest modes (the ``dirty`` guest with ``mib=B``, B = 64 or a quarter of a smaller RAM):
``idle`` runs one pass over its buffer and halts (``idle=1``): B MiB of data, the rest of
RAM never touched. ``dirty`` keeps rewriting the buffer, so every page of it is dirty
again about every pass. Migration starts once the guest printed its first pass. After a
``dirty`` migration the destination's next pass line must say ``bad 0`` (the guest
checked every word of its buffer), else the run counts as failed.

Columns are the source's ``query-migrate`` numbers: ``total-time``, ``downtime``,
``ram.transferred`` and ``ram.dirty-sync-count`` ("passes"; each engine counts its own
syncs: hv one per RAM round before the pause, QEMU also its initial and final sync, so
an idle QEMU migration says 3 where hv says 1). MiB/s is transferred / total time, for
both engines the same way; for a mostly-zero guest it is bounded by scanning, not by the
link (``--dirty-mib 768`` makes a data-heavy guest to measure the wire rate).

Not a test: it measures; the goals (downtime <= 300 ms and <= QEMU's, total time <=
QEMU's) are printed as a verdict per row, never asserted. ``% raw`` is information, not a
goal: an idle guest's rate is bounded by scanning mostly-zero RAM, not by the link, so a
verdict on it could never be met (issue 13 item 4).

``--tls`` adds, for every hv combination, the same migration over TLS (``link`` reads
``tcp+tls``/``unix+tls``), right below its plain row, with throwaway certificates made
by the ``openssl`` CLI for this run (:mod:`hv.migration.tls_certs`): ``-object
tls-creds-x509`` on both ends and ``tls-creds`` set on both before the migration. The
TLS rate is printed beside the plain one (``tls/plain`` line); nothing is asserted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hv.bench.common import BenchError, VmProcess, kvm_usable, parse_size, size_text
from hv.migration.tls_certs import OPENSSL_MISSING, have_openssl, server_and_client
from hv_fixtures import guest as fixture_guest

log = logging.getLogger("hv.bench")

DEFAULT_KERNEL = fixture_guest("x86_64", "dirty")
MIB = 1 << 20
CHUNK = MIB                       # raw loopback loop: 1 MiB sendall / recv_into
DOWNTIME_LIMIT_MS = 300
TLS_ID = "tls0"
TLS_HOSTNAME = "localhost"        # in the throwaway server certificate's subjectAltName
QEMU_UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s: QEMU has no "0 = unlimited"
USAGE_MIGRATE = "hv bench migrate [--sizes 256M,1G] [--modes idle,dirty] [--transports tcp,unix] " \
                "[--accels kvm,unicorn] [--repeat 3] [--no-qemu] [--tls]"


# -- one migration -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    engine: str       # "hv" or "qemu"
    accel: str        # kvm / unicorn (hv), kvm / tcg (qemu)
    size_mib: int
    mode: str         # idle / dirty
    transport: str    # tcp / unix
    tls: bool = False  # hv only: the same migration over TLS

    @property
    def link(self) -> str:
        return f"{self.transport}+tls" if self.tls else self.transport

    def label(self) -> str:
        return f"{self.engine} {self.accel} {size_text(self.size_mib)} {self.mode} {self.link}"


@dataclass(frozen=True)
class Sample:
    total_ms: int
    downtime_ms: int
    transferred: int
    passes: int

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


def buffer_mib(size_mib: int, dirty_mib: int | None) -> int:
    """The guest's buffer: --dirty-mib as given (at most 3/4 of RAM), by default 64 MiB
    or a quarter of a smaller RAM."""
    if dirty_mib is None:
        return max(1, min(64, size_mib // 4))
    return max(1, min(dirty_mib, size_mib * 3 // 4))


@dataclass(frozen=True)
class Settings:
    kernel: Path
    dirty_mib: int | None
    timeout: float
    qemu: str | None
    hv: tuple[str, ...] = (sys.executable, "-m", "hv")
    tls_dirs: tuple[Path, Path] | None = None   # (server, client) certificate directories


def _guest_append(case: Case, settings: Settings) -> str:
    append = f"mib={buffer_mib(case.size_mib, settings.dirty_mib)}"
    return append + " idle=1" if case.mode == "idle" else append


def _hv_argv(case: Case, settings: Settings, qmp: str, serial: Path, incoming: str | None) -> list[str]:
    argv = [*settings.hv, "-machine", "q35", "-accel", case.accel, "-m", str(case.size_mib),
            "-kernel", str(settings.kernel), "-append", _guest_append(case, settings),
            "-serial", f"file,path={serial}", "-qmp", f"unix:{qmp},server,nowait"]
    if case.tls:
        assert settings.tls_dirs is not None
        server, client = settings.tls_dirs
        endpoint, directory = ("server", server) if incoming else ("client", client)
        argv += ["-object", f"tls-creds-x509,id={TLS_ID},endpoint={endpoint},dir={directory}"]
        incoming = "defer" if incoming else None   # tls-creds first, then migrate-incoming
    return argv + ["-incoming", incoming] if incoming else argv


def _qemu_argv(case: Case, settings: Settings, qmp: str, serial: Path, incoming: str | None) -> list[str]:
    assert settings.qemu is not None
    argv = [settings.qemu, "-M", "q35", "-accel", case.accel, "-m", f"{case.size_mib}M", "-nodefaults",
            "-display", "none", "-no-user-config", "-kernel", str(settings.kernel),
            "-append", _guest_append(case, settings), "-serial", f"file:{serial}",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv + ["-incoming", incoming] if incoming else argv


def _incoming_uri(case: Case, workdir: Path) -> str:
    if case.transport == "tcp":
        return "tcp:127.0.0.1:0"  # an ephemeral port; each engine says which
    return f"unix:{workdir / 'mig.sock'}"


def _destination_uri(case: Case, dst: VmProcess, listen_uri: str) -> str:
    if case.transport == "unix":
        path = listen_uri[len("unix:"):]
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            dst.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{dst.name} never listened on {path}")
            time.sleep(0.02)
        return listen_uri
    if case.engine == "hv":
        return dst.wait_stderr(r"waiting for an incoming migration on (\S+)", 30).group(1)
    # QEMU reports the port it bound in the destination's query-migrate.
    assert dst.qmp is not None
    deadline = time.monotonic() + 30
    while True:
        for address in dst.qmp.execute("query-migrate").get("socket-address", []):
            if address.get("type") in ("inet", "tcp") and address.get("port"):
                return f"tcp:{address['host']}:{address['port']}"
        if time.monotonic() > deadline:
            raise BenchError("QEMU destination never reported its listening port")
        time.sleep(0.02)


def check_guest(dst: VmProcess, timeout: float) -> None:
    """The migrated dirty guest's next pass must find its whole buffer as it left it."""
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(r"pass \d+ sum [0-9a-f]{16} bad (\d+)\n", dst.output())
        if match:
            if match.group(1) != "0":
                raise BenchError(f"the migrated guest found {match.group(1)} bad words: RAM was corrupted")
            return
        dst.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"the migrated guest printed no pass within {timeout:.0f} s")
        time.sleep(0.02)


def migrate_once(case: Case, settings: Settings) -> Sample:
    """Start source and destination, wait for the guest's first pass, migrate, measure."""
    make_argv = _hv_argv if case.engine == "hv" else _qemu_argv
    with tempfile.TemporaryDirectory(prefix="hvb") as tmp:  # short: AF_UNIX paths are bounded
        workdir = Path(tmp)
        started: list[VmProcess] = []
        try:
            listen_uri = _incoming_uri(case, workdir)
            src = VmProcess("src", make_argv(case, settings, str(workdir / "src.qmp"), workdir / "src.serial", None),
                            workdir, workdir / "src.serial")
            started.append(src)
            dst = VmProcess("dst", make_argv(case, settings, str(workdir / "dst.qmp"), workdir / "dst.serial",
                                             listen_uri), workdir, workdir / "dst.serial")
            started.append(dst)
            source = src.connect_qmp(str(workdir / "src.qmp"))
            destination = dst.connect_qmp(str(workdir / "dst.qmp"))
            if case.tls:   # libvirt's order: -incoming defer, tls-creds, migrate-incoming
                destination.execute("migrate-set-parameters", **{"tls-creds": TLS_ID})
                destination.execute("migrate-incoming", uri=listen_uri)
                source.execute("migrate-set-parameters", **{"tls-creds": TLS_ID, "tls-hostname": TLS_HOSTNAME})
            src.wait_output("pass 1 ", settings.timeout)
            uri = _destination_uri(case, dst, listen_uri)
            if case.engine == "qemu":
                source.execute("migrate-set-capabilities",
                               capabilities=[{"capability": "auto-converge", "state": True}])
                source.execute("migrate-set-parameters", **{"max-bandwidth": QEMU_UNLIMITED_BANDWIDTH})
            source.execute("migrate-set-parameters", **{"downtime-limit": DOWNTIME_LIMIT_MS})
            source.execute("migrate", uri=uri)
            deadline = time.monotonic() + settings.timeout
            while True:
                info = source.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "canceled", "cancelled"):
                    raise BenchError(f"{case.label()}: migration {status}: {info.get('error-desc', '')}")
                if time.monotonic() > deadline:
                    source.execute("migrate_cancel")
                    raise BenchError(f"{case.label()}: no completion within {settings.timeout:.0f} s "
                                     f"(status {status}, passes {info.get('ram', {}).get('dirty-sync-count')})")
                time.sleep(0.02)
            ram = info.get("ram", {})
            if case.mode == "dirty":
                check_guest(dst, settings.timeout)
            return Sample(total_ms=int(info["total-time"]), downtime_ms=int(info["downtime"]),
                          transferred=int(ram["transferred"]), passes=int(ram["dirty-sync-count"]))
        finally:
            for process in reversed(started):
                process.close()


# -- raw loopback rate ------------------------------------------------------------------------------
def _socket_pair(transport: str, workdir: Path) -> tuple[socket.socket, socket.socket]:
    if transport == "tcp":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address: Any = ("127.0.0.1", 0)
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = str(workdir / "raw.sock")
    with listener:
        listener.bind(address)
        listener.listen(1)
        client = socket.socket(listener.family, socket.SOCK_STREAM)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def loopback_rate(transport: str, total_mib: int) -> float:
    """Bytes/s of a 1 MiB sendall / recv_into loop over a fresh connection (two threads)."""
    total = total_mib * MIB
    with tempfile.TemporaryDirectory(prefix="hvb") as tmp:
        sender, receiver = _socket_pair(transport, Path(tmp))
        failure: list[str] = []

        def receive() -> None:
            buf = memoryview(bytearray(CHUNK))
            got = 0
            while got < total:
                n = receiver.recv_into(buf[:min(CHUNK, total - got)])
                if not n:
                    failure.append("early EOF")
                    return
                got += n

        with sender, receiver:
            thread = threading.Thread(target=receive, name="raw-recv")
            payload = memoryview(os.urandom(CHUNK))
            started = time.monotonic()
            thread.start()
            for _ in range(total_mib):
                sender.sendall(payload)
            thread.join()
            elapsed = time.monotonic() - started
    if failure:
        raise BenchError(f"raw {transport} loop: {failure[0]}")
    return total / elapsed


# -- the whole benchmark ------------------------------------------------------------------------------
def build_cases(args: argparse.Namespace, qemu_accel: str | None) -> list[Case]:
    cases = []
    for size in args.sizes:
        for mode in args.modes:
            for transport in args.transports:
                for accel in args.accels:
                    cases.append(Case("hv", accel, size, mode, transport))
                    if args.tls:
                        cases.append(Case("hv", accel, size, mode, transport, tls=True))
                if qemu_accel is not None:
                    cases.append(Case("qemu", qemu_accel, size, mode, transport))
    return cases


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(rows: Iterable[Row], raw: dict[str, float]) -> str:
    rows = list(rows)
    qemu = {(r.case.size_mib, r.case.mode, r.case.transport): r for r in rows
            if r.case.engine == "qemu" and r.samples}
    header = ("engine", "accel", "size", "mode", "link", "total ms", "down ms", "sent MiB", "passes",
              "MiB/s", "% raw", "total/Q", "down/Q", "goals")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        c = row.case
        base = (c.engine, c.accel, size_text(c.size_mib), c.mode, c.link)
        if not row.samples:
            lines.append(base + ("failed: " + (row.errors[-1] if row.errors else "?"),))
            continue
        total, down = row.median("total_ms"), row.median("downtime_ms")
        rate = row.median("throughput")
        fraction = rate / raw[c.transport] if raw.get(c.transport) else None
        ref = qemu.get((c.size_mib, c.mode, c.transport)) if c.engine == "hv" else None
        total_ratio = total / max(ref.median("total_ms"), 1) if ref else None
        down_ratio = down / max(ref.median("downtime_ms"), 1) if ref else None
        goals = []
        if c.engine == "hv":
            goals.append("down" if down > DOWNTIME_LIMIT_MS or (down_ratio or 0) > 1 else "")
            goals.append("total" if (total_ratio or 0) > 1 else "")
        missed = ",".join(g for g in goals if g) + (" missed" if any(goals) else "")
        verdict = "ok" if c.engine == "hv" and not any(goals) else missed
        partial = f" ({len(row.samples)}/{len(row.samples) + len(row.errors)} ok)" if row.errors else ""
        lines.append(base + (f"{total:.0f}", f"{down:.0f}", f"{row.median('transferred') / MIB:.1f}",
                             f"{row.median('passes'):.0f}", f"{rate / MIB:.0f}",
                             "-" if fraction is None else f"{fraction * 100:.0f}%",
                             _fmt_ratio(total_ratio), _fmt_ratio(down_ratio),
                             (verdict if c.engine == "hv" else "") + partial))
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [cell.rjust(widths[i]) if i >= 5 and i < len(header) - 1 else cell.ljust(widths[i])
                 for i, cell in enumerate(line)]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "-" * len(out[0]))
    out.extend(tls_lines(rows))
    raw_text = ", ".join(f"{t} {rate / MIB:.0f} MiB/s" for t, rate in raw.items())
    out.append(f"raw loopback (1 MiB sendall/recv_into, median): {raw_text}")
    out.append("medians; MiB/s = transferred / total time; total/Q, down/Q = hv / QEMU; goals: downtime "
               f"<= {DOWNTIME_LIMIT_MS} ms and <= QEMU, total <= QEMU (% raw is not a goal)")
    return "\n".join(out)


def tls_lines(rows: list[Row]) -> list[str]:
    """One line per TLS row whose plain twin has samples: both rates and their ratio."""
    plain = {dataclasses.replace(r.case, tls=False): r for r in rows if not r.case.tls and r.samples}
    lines = []
    for row in rows:
        twin = plain.get(dataclasses.replace(row.case, tls=False)) if row.case.tls and row.samples else None
        if twin is not None:
            tls_rate, plain_rate = row.median("throughput"), twin.median("throughput")
            lines.append(f"tls/plain {twin.case.label()}: {tls_rate / MIB:.0f} vs {plain_rate / MIB:.0f} MiB/s "
                         f"({tls_rate / plain_rate:.2f})")
    return lines


def _list(kind: str, allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind}: choose from {', '.join(allowed)}")
        return items
    return parse


def _sizes(text: str) -> list[int]:
    return [parse_size(t) for t in text.split(",") if t.strip()]


def migrate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hv bench migrate", description="Live-migration benchmark (hv vs QEMU).")
    p.add_argument("--sizes", type=_sizes, default=[256, 1024], help="guest RAM sizes (default 256M,1G)")
    p.add_argument("--modes", type=_list("modes", ("idle", "dirty")), default=["idle", "dirty"])
    p.add_argument("--transports", type=_list("transports", ("tcp", "unix")), default=["tcp", "unix"])
    p.add_argument("--accels", type=_list("accels", ("kvm", "unicorn")), default=None,
                   help="hv accelerators (default kvm,unicorn; kvm only when /dev/kvm is usable)")
    p.add_argument("--repeat", type=int, default=3, help="runs per combination (median; default 3)")
    p.add_argument("--no-qemu", action="store_true", help="do not run QEMU even when installed")
    p.add_argument("--dirty-mib", type=int, default=None,
                   help="guest buffer in MiB (at most 3/4 of RAM; default 64, or RAM/4 if smaller)")
    p.add_argument("--loopback-mib", type=int, default=1024, help="bytes per raw loopback sample (MiB)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per migration before giving up")
    p.add_argument("--kernel", type=Path, default=DEFAULT_KERNEL, help="the dirty fixture guest")
    p.add_argument("--hv", default=None, help="command that runs hv (default: this Python -m hv), "
                   "e.g. to measure a patched hv")
    p.add_argument("--json", type=Path, help="also write every sample to this file")
    p.add_argument("--tls", action="store_true",
                   help="also migrate each hv combination over TLS (throwaway certificates, openssl CLI)")
    return p


def run_migrate(argv: list[str]) -> int:
    args = migrate_parser().parse_args(argv)
    if args.repeat < 1 or (args.dirty_mib is not None and args.dirty_mib < 1) or args.loopback_mib < 1:
        print("hv bench migrate: --repeat, --dirty-mib and --loopback-mib must be positive", file=sys.stderr)
        return 2
    if not args.kernel.is_file():
        print(f"hv bench migrate: {args.kernel}: no such file", file=sys.stderr)
        return 2
    kvm = kvm_usable()
    if args.accels is None:
        args.accels = ["kvm", "unicorn"] if kvm else ["unicorn"]
    elif "kvm" in args.accels and not kvm:
        log.warning("/dev/kvm is not usable here: skipping the kvm rows")
        args.accels = [a for a in args.accels if a != "kvm"]
    qemu = None if args.no_qemu else shutil.which("qemu-system-x86_64")
    hv = tuple(shlex.split(args.hv)) if args.hv else (sys.executable, "-m", "hv")
    settings = Settings(kernel=args.kernel.resolve(), dirty_mib=args.dirty_mib, timeout=args.timeout, qemu=qemu,
                        hv=hv)
    cases = build_cases(args, ("kvm" if kvm else "tcg") if qemu else None)
    if not cases:
        print("hv bench migrate: nothing to run", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hvtls") as certs:
        if args.tls and have_openssl():
            settings = dataclasses.replace(settings, tls_dirs=server_and_client(Path(certs)))
        elif args.tls:
            log.warning("--tls: %s; the TLS rows are skipped", OPENSSL_MISSING)
            cases = [c for c in cases if not c.tls]
        rows, raw = _measure(args, settings, cases)
    print(format_table(rows, raw))
    print(f"({len(cases)} combinations x {args.repeat} runs in {time.monotonic() - started:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps({"raw": raw, "rows": [
            {"case": row.case.__dict__, "samples": [s.__dict__ for s in row.samples], "errors": row.errors}
            for row in rows]}, indent=1))
    return 0 if all(row.samples for row in rows) else 1


def _measure(args: argparse.Namespace, settings: Settings, cases: list[Case]) -> tuple[list[Row], dict[str, float]]:
    """The raw loopback rates, then every case ``--repeat`` times, interleaved."""
    raw = {t: statistics.median(loopback_rate(t, args.loopback_mib) for _ in range(3)) for t in args.transports}
    for transport, rate in raw.items():
        log.info("raw %s loopback: %.0f MiB/s", transport, rate / MIB)
    rows = [Row(case) for case in cases]
    for repetition in range(args.repeat):  # interleaved, so a slow minute spreads over every row
        for row in rows:
            try:
                sample = migrate_once(row.case, settings)
            except BenchError as exc:
                log.warning("%s: %s", row.case.label(), exc)
                row.errors.append(str(exc))
                continue
            row.samples.append(sample)
            log.info("%s run %d: total %d ms, downtime %d ms, %.1f MiB, %d passes", row.case.label(),
                     repetition + 1, sample.total_ms, sample.downtime_ms, sample.transferred / MIB, sample.passes)
    return rows, raw
