"""``hv bench linux``: a real Linux guest booted and migrated by hv and by QEMU, side by side.

The guest is the stock Debian 12 kernel with hv's busybox initramfs
(``fixtures/linux/build_images.py`` puts them in ``~/.cache/hv/images/<arch>/``): x86_64
boots the PVH ``vmlinux`` on q35, aarch64 the raw ``vmlinuz`` Image on virt (GICv3). The
initramfs runs the workload ``wl`` in the foreground (``hv_shell=0``), which prints
``wl: start ...`` and then ``wl: pass N ok ...`` after each pass over its memory buffer and
file.

Boot: hv on ``-accel unicorn`` and QEMU on ``-accel tcg`` start the same kernel, initramfs
and command line (``hv_shell=0 wl_passes=N hv_end=poweroff``); the seconds from starting
the process to the kernel's ``Run /init as init process`` line and to ``wl: pass 1 ok`` are
read by watching the serial file every 20 ms.

Migration: the same guest with ``wl_passes=0`` (runs forever) is migrated once its first
pass is printed, hv -> hv and QEMU -> QEMU over each transport. Total time is the source's
``query-migrate`` ``total-time``; downtime is measured the same way for both engines: from
the source's STOP event to the destination's RESUME event (QMP timestamps, one host
clock). The guest survived when the destination prints a pass numbered above the last one
the source printed, and neither console shows ``BAD``, an Oops, a panic or a segfault.

Every measurement runs ``--repeat`` times, interleaved (each repetition runs every row
once), and the table shows medians. Not a test: it measures and prints.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hv.bench.common import (
    HV_COMMAND,
    BenchError,
    VmProcess,
    bytecode_note,
    destination_uri,
    event_time,
    incoming_uri,
    size_text,
)

log = logging.getLogger("hv.bench")

USAGE_LINUX = ("hv bench linux [--arches x86_64,aarch64] [--repeat 3] [--passes 1] [--transports unix,tcp] "
               "[--parts boot,migrate] [--no-qemu] [--json FILE]")
MILESTONES = ("Linux version", "Run /init", "wl: start", "wl: pass 1 ok")
# A guest is broken when a pass finds its data changed or the kernel reports a fault
# ("[#1]" marks every oops/BUG/GPF report on both arches).
BROKEN_RE = re.compile(r"wl: pass \d+ BAD|Oops|[Kk]ernel panic|segfault|Unable to handle kernel|kernel BUG|"
                       r"BUG:|\] \[#\d+\]|general protection fault|list_\w+ corruption|Internal error|"
                       r"hv-init: workload exited")
SURVIVE = 120.0   # seconds the destination has to print its next pass
PASS_RE = re.compile(r"wl: pass (\d+) ok")
POLL = 0.02   # seconds between looks at a serial file


@dataclass(frozen=True)
class ArchSpec:
    """How each engine runs one arch's guest."""
    arch: str
    hv_machine: str
    console: str
    kernel: str            # file name in the image directory
    qemu: str              # QEMU binary
    qemu_package: str      # the Debian package that has it
    qemu_machine: tuple[str, ...]


ARCHES = {
    "x86_64": ArchSpec("x86_64", "q35", "ttyS0", "vmlinux", "qemu-system-x86_64", "qemu-system-x86",
                       ("-M", "q35", "-cpu", "max")),
    "aarch64": ArchSpec("aarch64", "virt", "ttyAMA0", "vmlinuz", "qemu-system-aarch64", "qemu-system-arm",
                        ("-M", "virt,gic-version=3", "-cpu", "cortex-a57")),
}


@dataclass(frozen=True)
class Settings:
    images: Path
    mem_mib: int
    passes: int
    append: str
    timeout: float
    qemu: dict[str, str]                 # arch -> QEMU binary (absent: hv only)
    hv: tuple[str, ...] = HV_COMMAND
    log_dir: Path | None = None
    qemu_x86_cpu: str = "max"


# -- command lines -------------------------------------------------------------------------------------
def kernel_append(spec: ArchSpec, settings: Settings, passes: int) -> str:
    end = " hv_end=poweroff" if passes else ""
    return f"console={spec.console} hv_shell=0 wl_passes={passes}{end} {settings.append}".strip()


def vm_argv(engine: str, spec: ArchSpec, settings: Settings, serial: Path, passes: int,
            qmp: str | None = None, incoming: str | None = None) -> list[str]:
    """The same guest on either engine: hv on Unicorn or QEMU on TCG, serial to a file."""
    images = settings.images / spec.arch
    common = ["-kernel", str(images / spec.kernel), "-initrd", str(images / "initramfs.cpio.gz"),
              "-append", kernel_append(spec, settings, passes)]
    if engine == "hv":
        argv = [*settings.hv, "-machine", spec.hv_machine, "-accel", "unicorn", "-m", str(settings.mem_mib),
                *common, "-serial", f"file,path={serial}"]
        if qmp:
            argv += ["-qmp", f"unix:{qmp},server,nowait"]
    else:
        machine = spec.qemu_machine
        if spec.arch == "x86_64":
            machine = (*machine[:-1], settings.qemu_x86_cpu)
        argv = [settings.qemu[spec.arch], *machine, "-accel", "tcg", "-m", f"{settings.mem_mib}M",
                "-nodefaults", "-no-user-config", "-display", "none", *common, "-serial", f"file:{serial}"]
        if qmp:
            argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv + ["-incoming", incoming] if incoming else argv


def accel_of(engine: str) -> str:
    return "unicorn" if engine == "hv" else "tcg"


# -- watching a console ----------------------------------------------------------------------------------
def watch(vm: VmProcess, marks: tuple[str, ...], timeout: float) -> dict[str, float]:
    """Seconds from the process start to the first line holding each of ``marks``; stops
    when the last mark is seen. Raises when the process ends first, the guest breaks or
    ``timeout`` passes."""
    seen: dict[str, float] = {}
    deadline = vm.started + timeout
    while True:
        text = vm.output()
        now = time.monotonic() - vm.started
        for mark in marks:
            if mark not in seen and mark in text:
                seen[mark] = now
        if marks[-1] in seen:
            return seen
        broken = BROKEN_RE.search(text)
        if broken:
            raise BenchError(f"{vm.name}: the guest broke: {broken.group(0)!r}")
        if vm.proc.poll() is not None:
            raise BenchError(f"{vm.name} exited with {vm.proc.returncode} before {marks[-1]!r} "
                             f"(saw {sorted(seen)}); {vm.stderr()[-300:].strip()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{vm.name}: no {marks[-1]!r} within {timeout:.0f} s (saw {sorted(seen)})")
        time.sleep(POLL)


def last_pass(text: str) -> int:
    numbers = [int(n) for n in PASS_RE.findall(text)]
    return max(numbers, default=0)


def keep_log(settings: Settings, name: str, vm: VmProcess) -> None:
    """With ``--log-dir``, keep the console of every run (for reading where time goes)."""
    if settings.log_dir is not None:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        (settings.log_dir / f"{name}.console").write_text(vm.output())


# -- one boot, one migration -------------------------------------------------------------------------------
@dataclass
class BootRow:
    arch: str
    engine: str
    samples: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, mark: str) -> float | None:
        values = [s[mark] for s in self.samples if mark in s]
        return statistics.median(values) if values else None


@dataclass(frozen=True)
class MigrationSample:
    total_ms: float          # the source's query-migrate total-time
    downtime_ms: float       # source STOP event -> destination RESUME event
    reported_downtime_ms: float   # the source's own query-migrate downtime
    survived: bool
    detail: str              # why the guest is counted as broken, or the passes seen


@dataclass
class MigrationRow:
    arch: str
    engine: str
    transport: str
    samples: list[MigrationSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, attribute: str) -> float | None:
        values = [getattr(s, attribute) for s in self.samples]
        return statistics.median(values) if values else None

    def broken(self) -> int:
        return sum(not s.survived for s in self.samples)


def boot_once(engine: str, spec: ArchSpec, settings: Settings, run: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="hvbl") as tmp:
        serial = Path(tmp) / "serial"
        vm = VmProcess(f"{engine}-{spec.arch}-boot", vm_argv(engine, spec, settings, serial, settings.passes),
                       Path(tmp), serial)
        try:
            return watch(vm, MILESTONES, settings.timeout)
        finally:
            vm.close()
            keep_log(settings, f"boot-{engine}-{spec.arch}-{run}", vm)


def migrate_once(engine: str, spec: ArchSpec, transport: str, settings: Settings, run: int) -> MigrationSample:
    """Boot a source, start a destination waiting for it, migrate after the first pass,
    time it by the QMP events and watch the guest on the destination."""
    with tempfile.TemporaryDirectory(prefix="hvbl") as tmp:  # short: AF_UNIX paths are bounded
        workdir = Path(tmp)
        started: list[VmProcess] = []
        try:
            listen = incoming_uri(transport, workdir)
            src = VmProcess("src", vm_argv(engine, spec, settings, workdir / "src.serial", 0,
                                           str(workdir / "src.qmp")), workdir, workdir / "src.serial")
            started.append(src)
            dst = VmProcess("dst", vm_argv(engine, spec, settings, workdir / "dst.serial", 0,
                                           str(workdir / "dst.qmp"), listen), workdir, workdir / "dst.serial")
            started.append(dst)
            source, destination = src.connect_qmp(str(workdir / "src.qmp")), dst.connect_qmp(str(workdir / "dst.qmp"))
            watch(src, ("wl: pass 1 ok",), settings.timeout)
            uri = destination_uri(engine, transport, dst, listen)
            if engine == "qemu":
                source.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})  # no 0 = unlimited
            source.execute("migrate", uri=uri)
            info = wait_completed(source, settings.timeout)
            stop = event_time(source.wait_event("STOP", 30))
            resume = event_time(destination.wait_event("RESUME", 30))
            survived, detail = guest_survived(src, dst, min(settings.timeout, SURVIVE))
            return MigrationSample(total_ms=float(info["total-time"]), downtime_ms=(resume - stop) * 1000,
                                   reported_downtime_ms=float(info.get("downtime", 0)), survived=survived,
                                   detail=detail)
        finally:
            for process in reversed(started):
                process.close()
            for process in started:
                keep_log(settings, f"migrate-{engine}-{spec.arch}-{transport}-{run}-{process.name}", process)


def wait_completed(source: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = source.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "canceled", "cancelled"):
            raise BenchError(f"migration {status}: {str(info.get('error-desc', ''))[:200]!r}")
        if time.monotonic() > deadline:
            source.execute("migrate_cancel")
            raise BenchError(f"migration not completed within {timeout:.0f} s (status {status})")
        time.sleep(POLL)


def guest_survived(src: VmProcess, dst: VmProcess, timeout: float) -> tuple[bool, str]:
    """True when the destination prints a pass above the source's last one, with no broken
    text on either console, within ``timeout`` seconds."""
    before = last_pass(src.output())
    deadline = time.monotonic() + timeout
    while True:
        text = dst.output()
        broken = BROKEN_RE.search(src.output()) or BROKEN_RE.search(text)
        if broken:
            return False, f"broken: {broken.group(0)!r}"
        after = last_pass(text)
        if after > before:
            return True, f"passes {before} -> {after}"
        if dst.proc.poll() is not None:
            return False, f"destination exited with {dst.proc.returncode} (last pass {before})"
        if time.monotonic() > deadline:
            return False, f"no pass after {before} within {timeout:.0f} s"
        time.sleep(POLL)


# -- the table ----------------------------------------------------------------------------------------------
def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(mine: float | None, reference: float | None) -> str:
    return "-" if mine is None or not reference else f"{mine / reference:.2f}"


def _layout(lines: list[tuple[str, ...]], left: int) -> list[str]:
    """Columns padded to their widest cell; the first ``left`` columns left-aligned."""
    width = max(len(line) for line in lines)
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(width)]
    out = ["  ".join(cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
                     for i, cell in enumerate(line)).rstrip() for line in lines]
    out.insert(1, "-" * len(out[0]))
    return out


def _runs(done: int, errors: list[str]) -> str:
    return f"{done}/{done + len(errors)}"


def format_boot(rows: list[BootRow]) -> list[str]:
    qemu = {r.arch: r for r in rows if r.engine == "qemu"}
    lines: list[tuple[str, ...]] = [("arch", "engine", "accel", "/init s", "pass 1 s", "/init hv/Q",
                                     "pass 1 hv/Q", "runs")]
    for row in rows:
        init, first = row.median("Run /init"), row.median("wl: pass 1 ok")
        ref = qemu.get(row.arch) if row.engine == "hv" else None
        lines.append((row.arch, row.engine, accel_of(row.engine), _seconds(init), _seconds(first),
                      _ratio(init, ref.median("Run /init")) if ref else "-",
                      _ratio(first, ref.median("wl: pass 1 ok")) if ref else "-",
                      _runs(len(row.samples), row.errors)))
    return _layout(lines, 3)


def format_migration(rows: list[MigrationRow]) -> list[str]:
    qemu = {(r.arch, r.transport): r for r in rows if r.engine == "qemu"}
    lines: list[tuple[str, ...]] = [("arch", "engine", "accel", "link", "total ms", "down ms", "own down ms",
                                     "total hv/Q", "down hv/Q", "survived", "runs")]
    for row in rows:
        total, down = row.median("total_ms"), row.median("downtime_ms")
        own = row.median("reported_downtime_ms")
        ref = qemu.get((row.arch, row.transport)) if row.engine == "hv" else None
        lines.append((row.arch, row.engine, accel_of(row.engine), row.transport,
                      "-" if total is None else f"{total:.0f}", "-" if down is None else f"{down:.0f}",
                      "-" if own is None else f"{own:.0f}",
                      _ratio(total, ref.median("total_ms")) if ref else "-",
                      _ratio(down, ref.median("downtime_ms")) if ref else "-",
                      f"{len(row.samples) - row.broken()}/{len(row.samples)}", _runs(len(row.samples), row.errors)))
    out = _layout(lines, 4)
    for engine in sorted({r.engine for r in rows}):
        mine = [r for r in rows if r.engine == engine]
        broken = sum(r.broken() for r in mine)
        out.append(f"broken guests, {engine}: {broken} of {sum(len(r.samples) for r in mine)} migrations")
        for row in mine:
            for sample in row.samples:
                if not sample.survived:
                    out.append(f"  {row.arch} {row.transport}: {sample.detail}")
    return out


def report(boots: list[BootRow], migrations: list[MigrationRow], settings: Settings,
           missing: list[str]) -> str:
    out = [(f"Linux guest: {size_text(settings.mem_mib)} RAM, wl_passes={settings.passes} for boot; "
            "medians of the runs")]
    out += missing
    if boots:
        out += ["", "boot: seconds from process start to 'Run /init' and 'wl: pass 1 ok'", *format_boot(boots)]
    if migrations:
        out += ["", ("migration after the first pass (down ms: source STOP event -> destination RESUME event; "
                     "own down ms: what the source's query-migrate says)"), *format_migration(migrations)]
    runs: list[BootRow | MigrationRow] = [*boots, *migrations]
    errors = [(r.arch, r.engine, e) for r in runs for e in r.errors]
    if errors:
        out += ["", "failed runs:"] + [f"  {arch} {engine}: {error}" for arch, engine, error in errors]
    return "\n".join(out)


# -- the command ----------------------------------------------------------------------------------------------
def _list(kind: str, allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind}: choose from {', '.join(allowed)}")
        return list(dict.fromkeys(items))
    return parse


def linux_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hv bench linux",
                                description="Linux boot and live migration, hv (Unicorn) vs QEMU (TCG).")
    p.add_argument("--arches", type=_list("arches", tuple(ARCHES)), default=list(ARCHES))
    p.add_argument("--parts", type=_list("parts", ("boot", "migrate")), default=["boot", "migrate"])
    p.add_argument("--transports", type=_list("transports", ("unix", "tcp")), default=["unix"])
    p.add_argument("--repeat", type=int, default=3, help="runs of every row (median; default 3)")
    p.add_argument("--passes", type=int, default=1, help="workload passes of a boot run (wl_passes; default 1)")
    p.add_argument("--mem", type=int, default=512, help="guest RAM in MiB (default 512)")
    p.add_argument("--append", default="", help="kernel parameters added to the bench's own")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per boot or migration step")
    p.add_argument("--no-qemu", action="store_true", help="do not run QEMU even when installed")
    p.add_argument("--images", type=Path, default=None,
                   help="image cache (default ${HV_IMAGE_CACHE:-~/.cache/hv/images})")
    p.add_argument("--hv", default=None, help="command that runs hv (default: this Python -m hv), e.g. "
                   "'env HV_UNICORN_X86_NATIVE=0 python -m hv' for the Python x86 event delivery")
    p.add_argument("--qemu-x86-cpu", default="max", metavar="MODEL",
                   help="QEMU's -cpu on x86_64 (default max; e.g. qemu64 to compare)")
    p.add_argument("--log-dir", type=Path, default=None, help="keep every run's console here")
    p.add_argument("--json", type=Path, help="also write every sample to this file")
    return p


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the options or the images, or None."""
    if args.repeat < 1 or args.passes < 1 or not 64 <= args.mem <= 16384 or args.timeout <= 0:
        return "--repeat and --passes must be positive, --mem 64..16384, --timeout positive"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.,=+-]{0,63}", args.qemu_x86_cpu):
        return f"--qemu-x86-cpu: not a CPU model: {args.qemu_x86_cpu[:64]!r}"
    for arch in args.arches:
        for name in (ARCHES[arch].kernel, "initramfs.cpio.gz"):
            if not (args.images / arch / name).is_file():
                return (f"no {args.images / arch / name}; build the images with: "
                        f"python fixtures/linux/build_images.py --arch {arch}")
    return None


def find_qemu(arches: list[str], disabled: bool) -> tuple[dict[str, str], list[str]]:
    """The QEMU binary of each arch, and a line for each one that is not installed."""
    found, missing = {}, []
    for arch in arches:
        spec = ARCHES[arch]
        path = None if disabled else shutil.which(spec.qemu)
        if path:
            found[arch] = path
        elif not disabled:
            missing.append(f"{spec.qemu} not installed (apt-get install {spec.qemu_package}): hv rows only")
    return found, missing


def run_all(args: argparse.Namespace, settings: Settings) -> tuple[list[BootRow], list[MigrationRow]]:
    """Every row ``--repeat`` times, interleaved, so a slow minute spreads over all of them."""
    engines = {arch: ["hv"] + (["qemu"] if arch in settings.qemu else []) for arch in args.arches}
    boots = [BootRow(arch, engine) for arch in args.arches for engine in engines[arch]] \
        if "boot" in args.parts else []
    migrations = [MigrationRow(arch, engine, transport) for arch in args.arches for transport in args.transports
                  for engine in engines[arch]] if "migrate" in args.parts else []
    for run in range(args.repeat):
        for boot in boots:
            try:
                boot.samples.append(boot_once(boot.engine, ARCHES[boot.arch], settings, run))
                log.info("boot %s %s run %d: %s", boot.arch, boot.engine, run + 1,
                         ", ".join(f"{k!r} {v:.2f} s" for k, v in boot.samples[-1].items()))
            except BenchError as exc:
                log.warning("boot %s %s: %s", boot.arch, boot.engine, exc)
                boot.errors.append(str(exc))
        for row in migrations:
            try:
                sample = migrate_once(row.engine, ARCHES[row.arch], row.transport, settings, run)
                row.samples.append(sample)
                log.info("migrate %s %s %s run %d: total %.0f ms, down %.0f ms (own %.0f), %s",
                         row.arch, row.engine, row.transport, run + 1, sample.total_ms, sample.downtime_ms,
                         sample.reported_downtime_ms, sample.detail)
            except BenchError as exc:
                log.warning("migrate %s %s %s: %s", row.arch, row.engine, row.transport, exc)
                row.errors.append(str(exc))
    return boots, migrations


def run_linux(argv: list[str]) -> int:
    args = linux_parser().parse_args(argv)
    if args.images is None:
        from hv_fixtures.linux.build_images import default_cache
        args.images = default_cache()
    args.images = args.images.expanduser()
    problem = _check(args)
    if problem:
        print(f"hv bench linux: {problem}", file=sys.stderr)
        return 2
    qemu, missing = find_qemu(args.arches, args.no_qemu)
    settings = Settings(images=args.images.resolve(), mem_mib=args.mem, passes=args.passes, append=args.append,
                        timeout=args.timeout, qemu=qemu,
                        hv=tuple(shlex.split(args.hv)) if args.hv else HV_COMMAND,
                        log_dir=args.log_dir, qemu_x86_cpu=args.qemu_x86_cpu)
    for line in missing:
        log.warning("%s", line)
    started = time.monotonic()
    boots, migrations = run_all(args, settings)
    print(report(boots, migrations, settings, missing))
    if boots and args.hv is None and (note := bytecode_note()) is not None:   # /init s includes it
        print(note)
    print(f"({args.repeat} runs of every row in {time.monotonic() - started:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "settings": {"mem_mib": args.mem, "passes": args.passes, "append": args.append,
                         "qemu": qemu, "repeat": args.repeat},
            "boot": [asdict(row) for row in boots], "migration": [asdict(row) for row in migrations]}, indent=1))
    return 0 if all(r.samples and not r.errors for r in boots) and \
        all(r.samples and not r.broken() for r in migrations) else 1
