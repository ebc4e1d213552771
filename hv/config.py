"""StratoVirt-compatible command line -> a validated, frozen :class:`VmConfig`.

The command line is untrusted input: every option is checked here, and every problem is
reported as a :class:`ConfigError` whose message is one line a user can act on.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path

from hv import values
from hv.boards.q35 import layout as q35_layout
from hv.boards.virt import layout as virt_layout
from hv.devconfig import (
    DevConfigError,
    DeviceConfig,
    DriveConfig,
    NetdevConfig,
    parse_device,
    parse_drive,
    parse_netdev,
)
from hv.errors import ConfigError
from hv.migration.tls import TlsConfigError, TlsCreds, make_creds
from hv.migration.transport import MigrationUri, MigrationUriError, parse_migration_uri
from hv.qmp.address import QmpAddressError, SocketSpec, parse_chardev_option, parse_mon_option, parse_qmp_option
from hv_backends.base import Arch

__all__ = ["ACCELERATORS", "Accel", "ConfigError", "INCOMING_DEFER", "Incoming", "IncomingDefer", "MACHINE_ARCH",
           "MACHINE_MAX_MEMORY", "MachineType", "OPTIONS", "ParsedArgs", "SerialConfig", "USAGE", "VmConfig",
           "parse_incoming",
           "parse_args", "parse_size", "split_kv"]

MIB = 1 << 20
GIB = 1 << 30



class MachineType(enum.StrEnum):
    """``-machine`` TYPE. A ``StrEnum``: it compares equal to, formats as and serialises
    like its name (``"q35"``), as migration streams and messages spell it."""

    Q35 = "q35"
    VIRT = "virt"

    @property
    def arch(self) -> Arch:
        return MACHINE_ARCH[self]


class Accel(enum.StrEnum):
    """``-accel`` NAME: the back-end that runs the vCPUs (``hv_backends.backend_class`` name)."""

    KVM = "kvm"
    UNICORN = "unicorn"


class IncomingDefer(enum.StrEnum):
    """``-incoming defer``: no URI yet; the QMP command migrate-incoming gives it."""

    DEFER = "defer"


INCOMING_DEFER = IncomingDefer.DEFER
#: What ``-incoming`` asked for: a parsed URI, or ``defer``.
Incoming = MigrationUri | IncomingDefer

MACHINE_ARCH = {MachineType.Q35: Arch.X86_64, MachineType.VIRT: Arch.AARCH64}
# The limits are the boards' layouts': 64 GiB on both (q35 puts RAM beyond 2816 MiB as
# 2 GiB low + the rest from 4 GiB, see hv.boards.q35.layout.ram_regions).
MACHINE_MAX_MEMORY = {MachineType.Q35: q35_layout.RAM_MAX_SIZE, MachineType.VIRT: virt_layout.RAM_MAX_SIZE}
MIN_MEMORY = 16 * MIB
MAX_SMP = 64
ACCELERATORS = tuple(Accel)


@dataclass(frozen=True)
class SerialConfig:
    kind: str = "none"  # "stdio" | "file" | "none"
    path: Path | None = None


def parse_incoming(text: str) -> Incoming:
    """``-incoming`` value -> ``defer`` or a parsed migration URI (parsed once, here)."""
    if text == INCOMING_DEFER:
        return INCOMING_DEFER
    try:
        return parse_migration_uri(text)
    except MigrationUriError as exc:
        raise ConfigError(f"-incoming: {exc}") from None


@dataclass(frozen=True)
class VmConfig:
    """A validated VM configuration. ``machine``, ``accel`` and ``incoming`` hold typed
    values; text given for them (``dataclasses.replace(config, incoming="unix:...")``) is
    parsed on construction, so every holder of a VmConfig sees the types."""

    machine: MachineType = MachineType.Q35
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    memory_bytes: int = 256 * MIB
    smp: int = 1
    serial: SerialConfig = field(default_factory=SerialConfig)
    accel: Accel | None = None
    name: str | None = None
    logfile: Path | None = None
    start_paused: bool = False
    incoming: Incoming | None = None
    qmp: tuple[SocketSpec, ...] = ()  # every -qmp, and every -chardev a -mon names
    drives: tuple[DriveConfig, ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    netdevs: tuple[NetdevConfig, ...] = ()
    objects: tuple[TlsCreds, ...] = ()  # -object tls-creds-x509,...

    def __post_init__(self) -> None:
        object.__setattr__(self, "machine", MachineType(self.machine))
        if self.accel is not None:
            object.__setattr__(self, "accel", Accel(self.accel))
        if isinstance(self.incoming, str):
            object.__setattr__(self, "incoming", parse_incoming(self.incoming))

    @property
    def arch(self) -> Arch:
        return self.machine.arch

    @property
    def incoming_live(self) -> bool:
        """A live migration arrives on a socket (tcp:/unix:): the images' locks are taken
        over from the source at the switch-over, so they open unlocked."""
        return isinstance(self.incoming, MigrationUri) and self.incoming.scheme in ("tcp", "unix")


@dataclass(frozen=True)
class ParsedArgs:
    """What the command line asked for: a VM to run, or an informational action."""

    action: str  # "run" | "help" | "version"
    config: VmConfig | None = None


# option name -> takes a value
OPTIONS: dict[str, bool] = {
    "-machine": True, "-M": True, "-kernel": True, "-initrd": True, "-append": True, "-m": True, "-smp": True,
    "-serial": True, "-accel": True, "-name": True, "-D": True, "-S": False, "-incoming": True,
    "-qmp": True, "-chardev": True, "-mon": True, "-drive": True, "-device": True,
    "-netdev": True, "-object": True, "-h": False, "-help": False, "-version": False, "-V": False, "-daemonize": False,
}
HELP_FLAGS = frozenset({"-h", "-help"})
VERSION_FLAGS = frozenset({"-version", "-V"})

USAGE = """\
usage: hv -machine q35|virt -kernel FILE [options]
       hv qmp SOCKET COMMAND [key=value ...] | hv qmp SOCKET --events
       hv migrate --qmp SOCKET URI [--max-bandwidth B] [--downtime-limit MS] [--interval S]
       hv bench migrate|blk|emulator|linux|stream|profile [options]

StratoVirt-compatible options (each also works with two dashes, as in QEMU: --m, --machine):
  -machine TYPE[,mem-share=off]  machine type: q35 (x86_64) or virt (aarch64)
  -kernel FILE                   q35: Linux bzImage, PVH vmlinux or multiboot ELF; virt: arm64 Image
                                 (raw or gzip), vmlinux or ELF
  -initrd FILE                   initial RAM disk for a Linux kernel
  -append STRING                 kernel command line
  -m SIZE                        guest RAM: 256, 256M, 1G (default 256M; at most 64G)
  -smp N | cpus=N                number of vCPUs (default 1)
  -serial stdio|file,path=FILE|none   console (default none)
  -qmp unix:PATH,server,nowait | tcp:HOST:PORT,server,nowait   QMP monitor
  -chardev socket,id=ID,path=PATH,server,nowait -mon chardev=ID,mode=control
  -drive file=FILE,id=ID[,readonly=on|off][,direct=on|off][,serial=S]   a raw disk image
  -device pcie-root-port,id=BUS,port=N[,addr=N][,chassis=N][,slot=N]  a hot-plug slot (bus BUS)
  -device virtio-blk-pci,drive=ID,id=ID[,bus=pcie.0|BUS][,addr=N]      a disk
  -netdev socket,id=ID,listen=PATH|connect=PATH | tap,id=ID,ifname=IF   a network backend
  -device virtio-net-pci,netdev=ID,id=ID[,mac=MAC][,bus=..][,addr=N]   a NIC
  -incoming tcp:HOST:PORT | unix:PATH | file:DIR   wait for a migration / restore a snapshot
  -incoming defer                wait for the QMP command migrate-incoming to say where
  -object tls-creds-x509,id=ID,endpoint=server|client,dir=DIR[,verify-peer=on|off]   TLS for migration
  -name NAME                     VM name (query-name)
  -D FILE                        write hv's log to FILE
  -S                             start paused (resume with the QMP command cont)
hv options:
  -accel kvm|unicorn             force an accelerator (default: kvm if usable, else unicorn)
  -h, --help                     this help
  -V, -version, --version        print the version

subcommands:
  hv qmp SOCKET COMMAND [key=value ...]   send one QMP command (SOCKET: path or tcp:HOST:PORT)
  hv qmp SOCKET --events                  follow the monitor's events, one JSON line each
  hv migrate --qmp SOCKET URI [--help]    start a live migration and show its progress to the end
  hv bench migrate [--help]               live-migration benchmark (hv vs QEMU where installed)
  hv bench blk [--help]                   virtio-blk throughput benchmark (hv vs QEMU and dd)
  hv bench emulator [--help]              guest speed, the same ELF on hv and QEMU
  hv bench linux [--help]                 Linux boot and migration, hv vs QEMU TCG where installed
  hv bench stream | profile [--help]      the migration stream alone; where a migration's time goes
"""


def parse_size(text: str, option: str) -> int:
    """`256` (MiB), `256M`, `256MiB`, `1G`, `524288K` -> bytes (:func:`hv.values.parse_size`)."""
    try:
        return values.parse_size(text)
    except values.ValueFormatError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def split_kv(text: str, option: str, positional: str | None = None) -> dict[str, str]:
    """`a,b=c,d=e` -> {positional: a, b: c, d: e}; duplicate keys are errors."""
    result: dict[str, str] = {}
    for index, item in enumerate(text.split(",")):
        if "=" in item:
            key, _, value = item.partition("=")
        elif index == 0 and positional is not None:
            key, value = positional, item
        else:
            key, value = item, ""
        if not key:
            raise ConfigError(f"{option}: malformed value {text!r}")
        if key in result:
            raise ConfigError(f"{option}: {key!r} given twice")
        result[key] = value
    return result


def _parse_objects(texts: list[str]) -> tuple[TlsCreds, ...]:
    """Every ``-object TYPE,id=ID,...``; only tls-creds-x509 exists, ids are unique."""
    objects: list[TlsCreds] = []
    for text in texts:
        props: dict[str, str | bool] = dict(split_kv(text, "-object", positional="qom-type"))
        qom_type = props.pop("qom-type")
        if qom_type != "tls-creds-x509":
            raise ConfigError(f"-object: unknown object type {qom_type!r} (hv supports tls-creds-x509)")
        try:
            creds = make_creds(props)
        except TlsConfigError as exc:
            raise ConfigError(f"-object: {exc}") from None
        if any(o.id == creds.id for o in objects):
            raise ConfigError(f"-object: duplicate object id {creds.id!r}")
        objects.append(creds)
    return tuple(objects)


def _parse_machine(value: str) -> MachineType:
    props = split_kv(value, "-machine", positional="type")
    machine = props.pop("type", "")
    if machine not in tuple(MachineType):
        raise ConfigError(f"-machine: unknown machine type {machine!r} (supported: q35, virt)")
    for key, prop in props.items():
        if key == "mem-share":
            if prop not in ("off", "false"):
                raise ConfigError("-machine: mem-share=on (shared guest memory) is not supported: "
                                  "it cannot be migrated")
        elif key in ("dump-guest-core", "gic-version", "accel", "usb"):
            continue  # accepted for command-line compatibility; no effect
        else:
            raise ConfigError(f"-machine: unknown property {key!r}")
    return MachineType(machine)


def _parse_smp(value: str) -> int:
    props = split_kv(value, "-smp", positional="cpus")
    cpus_text = props.pop("cpus", "")
    for key in props:
        if key not in ("maxcpus", "sockets", "cores", "threads", "dies", "clusters"):
            raise ConfigError(f"-smp: unknown property {key!r}")
    if not cpus_text.isdigit():
        raise ConfigError(f"-smp: invalid vCPU count {cpus_text!r}")
    cpus = int(cpus_text)
    if not 1 <= cpus <= MAX_SMP:
        raise ConfigError(f"-smp: vCPU count must be between 1 and {MAX_SMP}, got {cpus}")
    return cpus


def _parse_serial(value: str) -> SerialConfig:
    if value in ("stdio", "none"):
        return SerialConfig(value)
    props = split_kv(value, "-serial", positional="kind")
    if props.get("kind") == "file":
        path = props.get("path")
        if not path or set(props) != {"kind", "path"}:
            raise ConfigError("-serial: expected file,path=FILE")
        parent = Path(path).expanduser().resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"-serial: directory {str(parent)!r} does not exist")
        return SerialConfig("file", Path(path))
    raise ConfigError(f"-serial: unsupported value {value!r} (use stdio, file,path=FILE or none)")


def _check_kernel(path_text: str, option: str = "-kernel") -> Path:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise ConfigError(f"{option}: {path_text}: no such file")
    if not path.is_file():
        raise ConfigError(f"{option}: {path_text}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option}: {path_text}: permission denied")
    return path


def _parse_monitors(values: dict[str, list[str]]) -> tuple[SocketSpec, ...]:
    try:
        specs = [parse_qmp_option(v) for v in values.get("-qmp", [])]
        chardevs: dict[str, SocketSpec] = {}
        for text in values.get("-chardev", []):
            chardev_id, spec = parse_chardev_option(text)
            if chardev_id in chardevs:
                raise ConfigError(f"-chardev: id {chardev_id!r} given twice")
            chardevs[chardev_id] = spec
        for text in values.get("-mon", []):
            chardev_id = parse_mon_option(text)
            if chardev_id not in chardevs:
                raise ConfigError(f"-mon: no -chardev with id {chardev_id!r}")
            specs.append(chardevs[chardev_id])
    except QmpAddressError as exc:
        raise ConfigError(str(exc)) from None
    unix_paths = [s.path for s in specs if s.kind == "unix"]
    if len(set(unix_paths)) != len(unix_paths):
        raise ConfigError("-qmp: the same socket path is given twice")
    return tuple(specs)


def parse_args(argv: list[str]) -> ParsedArgs:
    values: dict[str, list[str]] = {}
    flags: set[str] = set()
    i = 0
    while i < len(argv):
        option = argv[i]
        if option.startswith("--") and option[1:] in OPTIONS:
            option = option[1:]  # QEMU's spelling: every option also takes two dashes
        if option not in OPTIONS:
            if option.startswith("-"):
                raise ConfigError(f"unknown option {option!r} (see hv --help)")
            raise ConfigError(f"unexpected argument {option!r} (see hv --help)")
        if OPTIONS[option]:
            if i + 1 >= len(argv):
                raise ConfigError(f"option {option} needs a value")
            values.setdefault(option, []).append(argv[i + 1])
            i += 2
        else:
            flags.add(option)
            i += 1
    if flags & HELP_FLAGS:
        return ParsedArgs("help")
    if flags & VERSION_FLAGS:
        return ParsedArgs("version")
    if "-daemonize" in flags:
        raise ConfigError("-daemonize is not supported: run hv under a service manager instead")
    try:
        drives = tuple(parse_drive(v) for v in values.get("-drive", []))
        netdevs = tuple(parse_netdev(v) for v in values.get("-netdev", []))
        devices = tuple(parse_device(v) for v in values.get("-device", []))
    except DevConfigError as exc:
        raise ConfigError(str(exc)) from None

    def single(*names: str) -> str | None:
        given = [v for n in names for v in values.get(n, [])]
        if len(given) > 1:
            raise ConfigError(f"option {names[0]} given more than once")
        return given[0] if given else None

    machine_text = single("-machine", "-M")
    if machine_text is None:
        raise ConfigError("-machine is required (q35 or virt)")
    machine = _parse_machine(machine_text)
    memory = VmConfig.memory_bytes
    if (m := single("-m")) is not None:
        memory = parse_size(m, "-m")
    if memory < MIN_MEMORY:
        raise ConfigError(f"-m: at least {MIN_MEMORY // MIB} MiB of RAM are needed")
    if memory % MIB:
        raise ConfigError("-m: RAM size must be a whole number of MiB")
    if memory > MACHINE_MAX_MEMORY[machine]:
        raise ConfigError(f"-m: machine {machine} supports at most {MACHINE_MAX_MEMORY[machine] // MIB} MiB of RAM")
    accel: Accel | None = None
    if (accel_text := single("-accel")) is not None:
        accel_name = split_kv(accel_text, "-accel", positional="accel")["accel"]
        if accel_name not in ACCELERATORS:
            raise ConfigError(f"-accel: unknown accelerator {accel_name!r} (choose kvm or unicorn)")
        accel = Accel(accel_name)
    incoming_text = single("-incoming")
    incoming = parse_incoming(incoming_text) if incoming_text is not None else None
    kernel_text = single("-kernel")
    if kernel_text is None and incoming is None:
        raise ConfigError("-kernel is required (unless -incoming restores a VM)")
    kernel = _check_kernel(kernel_text) if kernel_text is not None else None
    initrd_text = single("-initrd")
    initrd = _check_kernel(initrd_text, "-initrd") if initrd_text is not None else None
    logfile = single("-D")
    if logfile is not None and not Path(logfile).expanduser().resolve().parent.is_dir():
        raise ConfigError(f"-D: directory of {logfile!r} does not exist")
    name = single("-name")
    if name is not None:
        name = split_kv(name, "-name", positional="guest")["guest"]
    serial = _parse_serial(single("-serial") or "none")
    smp_text = single("-smp")
    qmp = _parse_monitors(values)
    objects = _parse_objects(values.get("-object", []))
    config = VmConfig(
        machine=machine,
        kernel=kernel,
        initrd=initrd,
        append=single("-append") or "",
        memory_bytes=memory,
        smp=_parse_smp(smp_text) if smp_text is not None else 1,
        serial=serial,
        accel=accel,
        name=name,
        logfile=Path(logfile) if logfile is not None else None,
        start_paused="-S" in flags,
        incoming=incoming,
        qmp=qmp,
        drives=drives,
        devices=devices,
        netdevs=netdevs,
        objects=objects,
    )
    return ParsedArgs("run", config)
