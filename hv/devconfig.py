"""``-drive`` and ``-device`` option values, parsed and validated.

    -drive file=PATH,id=ID[,readonly=on|off][,direct=on|off][,serial=S][,if=none][,format=raw]
    -device pcie-root-port,id=BUS,port=N[,chassis=N][,slot=N][,addr=SLOT[.FN]][,bus=pcie.0][,multifunction=on|off]
    -device virtio-blk-pci,drive=ID,id=ID[,bus=pcie.0|BUS][,addr=SLOT[.FN]][,serial=S]
    -netdev socket,id=ID,listen=PATH | socket,id=ID,connect=PATH | tap,id=ID,ifname=IF
    -device virtio-net-pci,netdev=ID[,id=ID][,mac=52:54:00:12:34:56][,bus=pcie.0|BUS][,addr=SLOT[.FN]]

A root port's ``id`` names its secondary bus: a device says ``bus=<that id>,addr=0[.F]``
(a PCIe link has one device). Whether a ``bus=`` exists is checked by the wiring.

:data:`DRIVERS` is the one table of device drivers: the properties each accepts, how they
become a :class:`DeviceConfig`, whether QMP may hot-plug it, and its saved state's type.
``-device`` (a ``key=value`` string) and QMP ``device_add`` (a JSON object) both go through
:func:`device_config` with the properties as a dictionary.

Every problem is a :class:`DevConfigError` whose message is one line naming the option
and what is wrong with it; the launcher prints it and exits 1.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hv import values
from hv.devices.pcie_root_port import PcieRootPortState
from hv.devices.virtio_net import VirtioNetState
from hv.devices.virtio_pci import VirtioPciState
from hv.errors import ConfigError

SERIAL_MAX = 20  # VIRTIO_BLK_ID_BYTES
ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}\Z")
ROOT_BUS = "pcie.0"
PHYSICAL_SLOT_MAX = (1 << 13) - 1   # Slot Capabilities' Physical Slot Number field
SUN_PATH_MAX = 107   # sockaddr_un.sun_path without the NUL
IFNAME_MAX = 15      # IFNAMSIZ - 1


class DevConfigError(ConfigError):
    """A -drive, -netdev or -device value is malformed, inconsistent or names an unusable file."""


@dataclass(frozen=True)
class DriveConfig:
    id: str
    file: Path
    readonly: bool = False
    direct: bool = False
    serial: str | None = None
    format: str = "raw"


@dataclass(frozen=True)
class DeviceConfig:
    driver: str
    id: str
    drive: str
    bus: str = "pcie.0"
    slot: int | None = None      # None: first free slot
    function: int = 0
    serial: str | None = None
    netdev: str | None = None    # virtio-net-pci
    mac: str | None = None       # virtio-net-pci, normalised lower case; None: assigned by the wiring
    port: int = 0                # pcie-root-port: Link Capabilities port number
    chassis: int = 0             # pcie-root-port
    physical_slot: int | None = None   # pcie-root-port slot=; None: the port number
    multifunction: bool = False

    @property
    def addr(self) -> str | None:
        return None if self.slot is None else f"{self.slot:#x}.{self.function}"


@dataclass(frozen=True)
class NetdevConfig:
    id: str
    kind: str                    # "socket" | "tap"
    path: Path | None = None     # socket
    role: str = "connect"        # socket: "listen" | "connect"
    ifname: str = ""             # tap


def _reject_unknown(option: str, what: str, pairs: dict[str, str], known: set[str]) -> None:
    """One line naming the first parameter that is not in ``known`` (sorted, so the
    message does not depend on the order on the command line)."""
    unknown = sorted(set(pairs) - known)
    if unknown:
        raise DevConfigError(f"{option} {what}: unknown parameter '{unknown[0]}'")


def _split(option: str, value: str) -> tuple[str | None, dict[str, str]]:
    """``"[first,]key=value,..."`` -> (first word or None, {key: value})."""
    if not value:
        raise DevConfigError(f"{option}: empty value")
    first: str | None = None
    pairs: dict[str, str] = {}
    for index, part in enumerate(value.split(",")):
        if not part:
            raise DevConfigError(f"{option} {value}: empty item")
        if "=" not in part:
            if index == 0:
                first = part
                continue
            raise DevConfigError(f"{option} {value}: '{part}' is not key=value")
        key, _, item = part.partition("=")
        if not key:
            raise DevConfigError(f"{option} {value}: '{part}' has no key")
        if key in pairs:
            raise DevConfigError(f"{option} {value}: '{key}' given twice")
        pairs[key] = item
    return first, pairs


def _on_off(option: str, key: str, value: str) -> bool:
    try:
        return values.parse_on_off(key, value)
    except values.ValueFormatError as exc:
        raise DevConfigError(f"{option}: {exc}") from None


def _check_id(option: str, key: str, value: str) -> str:
    if not ID_RE.match(value):
        raise DevConfigError(f"{option}: {key}={value!r}: ids start with a letter and use letters, "
                             "digits, '_', '.', '-' (at most 64)")
    return value


def _check_serial(option: str, value: str) -> str:
    if len(value.encode()) > SERIAL_MAX or not value.isprintable() or not value.isascii():
        raise DevConfigError(f"{option}: serial={value!r}: at most {SERIAL_MAX} printable ASCII characters")
    return value


def parse_drive(value: str) -> DriveConfig:
    """Parse one ``-drive`` value; checks the image exists and can be opened as asked."""
    option = "-drive"
    first, pairs = _split(option, value)
    if first is not None:
        raise DevConfigError(f"{option} {value}: '{first}' is not key=value")
    _reject_unknown(option, value, pairs, {"file", "id", "readonly", "direct", "serial", "if", "format"})
    for required in ("file", "id"):
        if not pairs.get(required):
            raise DevConfigError(f"{option} {value}: {required}= is required")
    drive_id = _check_id(option, "id", pairs["id"])
    readonly = _on_off(option, "readonly", pairs.get("readonly", "off"))
    direct = _on_off(option, "direct", pairs.get("direct", "off"))
    if pairs.get("if", "none") != "none":
        raise DevConfigError(f"{option}: if={pairs['if']}: only if=none is supported")
    if pairs.get("format", "raw") != "raw":
        raise DevConfigError(f"{option}: format={pairs['format']}: only raw images are supported")
    serial = _check_serial(option, pairs["serial"]) if "serial" in pairs else None
    path = Path(pairs["file"])
    if not path.exists():
        raise DevConfigError(f"{option}: file={path}: no such file")
    if path.is_dir():
        raise DevConfigError(f"{option}: file={path}: is a directory, not a disk image")
    try:  # a real open: permission bits, immutable files, read-only mounts all count
        os.close(os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC))
    except OSError as exc:
        wanted = "read" if readonly else "read and write"
        hint = "" if readonly else " (use readonly=on for a read-only image)"
        raise DevConfigError(f"{option}: file={path}: cannot open to {wanted}: {exc.strerror}{hint}") from None
    return DriveConfig(drive_id, path, readonly, direct, serial)


def parse_netdev(value: str) -> NetdevConfig:
    """Parse one ``-netdev`` value (the socket or tap itself is opened by the wiring)."""
    option = "-netdev"
    kind, pairs = _split(option, value)
    if kind not in ("socket", "tap"):
        raise DevConfigError(f"{option} {value}: the first item must be the backend type (socket or tap)")
    known = {"socket": {"id", "listen", "connect", "path", "server"}, "tap": {"id", "ifname"}}[kind]
    _reject_unknown(option, kind, pairs, known)
    if not pairs.get("id"):
        raise DevConfigError(f"{option} {kind}: id= is required")
    netdev_id = _check_id(option, "id", pairs["id"])
    if kind == "tap":
        ifname = pairs.get("ifname", "")
        if not ifname or len(ifname.encode()) > IFNAME_MAX or not re.fullmatch(r"[A-Za-z0-9_.:-]+", ifname):
            raise DevConfigError(f"{option} tap,id={netdev_id}: ifname={ifname!r}: an interface name of "
                                 f"1-{IFNAME_MAX} letters, digits, '_', '.', ':', '-' is required")
        return NetdevConfig(netdev_id, "tap", ifname=ifname)
    roles = [key for key in ("listen", "connect", "path") if key in pairs]
    if len(roles) != 1:
        raise DevConfigError(f"{option} socket,id={netdev_id}: give exactly one of listen=PATH, connect=PATH "
                             "or path=PATH[,server=on|off]")
    if "server" in pairs and roles[0] != "path":
        raise DevConfigError(f"{option} socket,id={netdev_id}: server= only goes with path=")
    text = pairs[roles[0]]
    role = roles[0] if roles[0] != "path" else \
        ("listen" if _on_off(option, "server", pairs.get("server", "off")) else "connect")
    if not text or len(text.encode()) > SUN_PATH_MAX:
        raise DevConfigError(f"{option} socket,id={netdev_id}: socket path must be 1-{SUN_PATH_MAX} bytes")
    path = Path(text)
    if role == "listen" and not path.expanduser().resolve().parent.is_dir():
        raise DevConfigError(f"{option} socket,id={netdev_id}: directory of {text} does not exist")
    return NetdevConfig(netdev_id, "socket", path=path, role=role)


def _parse_net_device(option: str, driver: str, pairs: dict[str, str]) -> DeviceConfig:
    if not pairs.get("netdev"):
        raise DevConfigError(f"{option} {driver}: netdev= is required")
    netdev = _check_id(option, "netdev", pairs["netdev"])
    device_id = _check_id(option, "id", pairs.get("id", netdev))
    mac: str | None = None
    if "mac" in pairs:
        try:
            mac = values.format_mac(values.parse_mac(pairs["mac"]))
        except values.ValueFormatError as exc:
            raise DevConfigError(f"{option} {driver}: {exc}") from None
    bus, slot, function = _placement(option, driver, pairs)
    return DeviceConfig(driver, device_id, "", bus, slot, function, None, netdev, mac)


def _placement(option: str, driver: str, pairs: dict[str, str]) -> tuple[str, int | None, int]:
    bus = _check_id(f"{option} {driver}", "bus", pairs.get("bus", ROOT_BUS))
    slot: int | None = None
    function = 0
    if "addr" in pairs:
        try:
            slot, function = values.parse_devfn(pairs["addr"])
        except values.ValueFormatError as exc:
            raise DevConfigError(f"{option} {driver}: {exc}") from None
    return bus, slot, function


def _parse_blk_device(option: str, driver: str, pairs: dict[str, str]) -> DeviceConfig:
    if not pairs.get("drive"):
        raise DevConfigError(f"{option} {driver}: drive= is required")
    drive = _check_id(option, "drive", pairs["drive"])
    device_id = _check_id(option, "id", pairs.get("id", drive))
    bus, slot, function = _placement(option, driver, pairs)
    serial = _check_serial(option, pairs["serial"]) if "serial" in pairs else None
    return DeviceConfig(driver, device_id, drive, bus, slot, function, serial)


def _number(option: str, driver: str, key: str, text: str, limit: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise DevConfigError(f"{option} {driver}: {key}={text}: not a number") from None
    if not 0 <= value <= limit:
        raise DevConfigError(f"{option} {driver}: {key}={text}: out of range 0-{limit:#x}")
    return value


def _parse_root_port(option: str, driver: str, pairs: dict[str, str]) -> DeviceConfig:
    if not pairs.get("id"):
        raise DevConfigError(f"{option} {driver}: id= is required (it names the port's bus)")
    port_id = _check_id(option, "id", pairs["id"])
    bus, slot, function = _placement(option, driver, pairs)
    if bus != ROOT_BUS:
        raise DevConfigError(f"{option} {driver},id={port_id}: bus={bus}: a root port goes on {ROOT_BUS}")
    port = _number(option, driver, "port", pairs.get("port", "0"), 0xFF)
    chassis = _number(option, driver, "chassis", pairs.get("chassis", "0"), 0xFF)
    physical = _number(option, driver, "slot", pairs["slot"], PHYSICAL_SLOT_MAX) if "slot" in pairs else None
    multifunction = _on_off(option, "multifunction", pairs.get("multifunction", "off"))
    return DeviceConfig(driver, port_id, "", bus, slot, function, port=port, chassis=chassis,
                        physical_slot=physical, multifunction=multifunction)


@dataclass(frozen=True)
class DeviceDriver:
    """One device driver of ``-device`` and ``device_add``.

    ``props`` are the properties it accepts (any other is refused, naming it); ``parse``
    turns them into a :class:`DeviceConfig` (``parse(option, driver, props)``, ``option``
    prefixing every error); ``hotplug`` says whether QMP may plug and unplug it at run time;
    ``state_type`` is the dataclass its saved state is restored into. The machine's PCI
    wiring plugs and unplugs each driver (``hv.machine.pci_wiring``: ``plug_device``,
    ``plug_net_device``, ``plug_root_port``, ``unplug_device``).
    """

    name: str
    props: frozenset[str]
    parse: Callable[[str, str, dict[str, str]], DeviceConfig]
    hotplug: bool
    state_type: type


_PLACEMENT = frozenset({"id", "bus", "addr", "multifunction"})
DRIVERS: dict[str, DeviceDriver] = {driver.name: driver for driver in (
    DeviceDriver("pcie-root-port", _PLACEMENT | {"port", "chassis", "slot"}, _parse_root_port, False,
                 PcieRootPortState),
    DeviceDriver("virtio-blk-pci", _PLACEMENT | {"drive", "serial"}, _parse_blk_device, True, VirtioPciState),
    DeviceDriver("virtio-net-pci", _PLACEMENT | {"netdev", "mac"}, _parse_net_device, True, VirtioNetState),
)}
DEVICE_DRIVERS = tuple(DRIVERS)
HOTPLUG_DRIVERS = tuple(name for name, driver in DRIVERS.items() if driver.hotplug)


def device_config(option: str, driver: str, props: Mapping[str, str]) -> DeviceConfig:
    """The one path from a driver name and its properties to a :class:`DeviceConfig`, for
    ``-device`` and QMP ``device_add`` alike; ``option`` names the caller in errors."""
    spec = DRIVERS.get(driver)
    if spec is None:
        raise DevConfigError(f"{option}: unknown device type '{driver}' (supported: {', '.join(DEVICE_DRIVERS)})")
    pairs = dict(props)
    _reject_unknown(option, driver, pairs, set(spec.props))
    return spec.parse(option, driver, pairs)


def parse_device(value: str) -> DeviceConfig:
    """Parse one ``-device`` value (placement is checked against the bus by the wiring)."""
    option = "-device"
    driver, pairs = _split(option, value)
    if driver is None:
        raise DevConfigError(f"{option} {value}: the first item must be the device type")
    return device_config(option, driver, pairs)
