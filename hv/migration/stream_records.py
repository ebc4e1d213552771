"""The CONFIG record of a migration stream: the configuration fingerprint, its validation
(every field of untrusted input checked, ids by :data:`hv.devconfig.ID_RE`) and the
comparison of a source's fingerprint with the destination's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hv.cpuid import tsc_hz_problem
from hv.devconfig import ID_RE
from hv.errors import StreamError
from hv.migration.stream_format import MAX_DEVICES, MAX_VCPUS, PAGE_SIZE
from hv.textsafe import printable


# --------------------------------------------------------------------------------------
# Configuration fingerprint
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceFingerprint:
    """One device as the compatibility check sees it."""

    type: str
    id: str
    bus: str = ""
    addr: str = ""
    # Attributes that must be equal on both ends (virtio-net "mac", drive "serial", ...).
    attrs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "bus": self.bus, "addr": self.addr,
                "attrs": dict(self.attrs)}


@dataclass(frozen=True)
class Fingerprint:
    """The configuration a destination must match before any guest state is touched."""

    arch: str
    machine: str
    vcpus: int
    memory: int  # bytes
    devices: tuple[DeviceFingerprint, ...] = ()
    # x86: the rate of the guest's TSC in Hz (format 1.4), which it calibrated at boot and
    # the destination must run it at (adopt or refuse: hv.machine.Machine.adopt_tsc_hz).
    # None: aarch64, or a stream older than 1.4 (taken as hv's former 1 GHz where the
    # destination can run it; see Machine.adopt_tsc_hz).
    tsc_hz: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"arch": self.arch, "machine": self.machine, "vcpus": self.vcpus,
                               "memory": self.memory, "devices": [d.to_dict() for d in self.devices]}
        if self.tsc_hz is not None:
            out["tsc_hz"] = self.tsc_hz
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> Fingerprint:
        """Validate an untrusted fingerprint object (from a stream) field by field."""
        if not isinstance(raw, dict):
            raise StreamError("config: expected a JSON object")
        expected = {"arch", "machine", "vcpus", "memory", "devices"}
        if set(raw) - {"tsc_hz"} != expected:
            raise StreamError(f"config: fields {sorted(raw)} differ from {sorted(expected)} (and tsc_hz)")
        arch = _check_str("config.arch", raw["arch"])
        tsc_hz = _check_tsc_hz(arch, raw["tsc_hz"]) if "tsc_hz" in raw else None
        machine = _check_str("config.machine", raw["machine"])
        vcpus = _check_uint("config.vcpus", raw["vcpus"], 1, MAX_VCPUS)
        memory = _check_uint("config.memory", raw["memory"], PAGE_SIZE, 1 << 48)
        if memory % PAGE_SIZE:
            raise StreamError(f"config.memory: {memory} is not a whole number of pages")
        devices_raw = raw["devices"]
        if not isinstance(devices_raw, list) or len(devices_raw) > MAX_DEVICES:
            raise StreamError(f"config.devices: expected a list of at most {MAX_DEVICES} devices")
        devices: list[DeviceFingerprint] = []
        seen: set[str] = set()
        for i, dev in enumerate(devices_raw):
            where = f"config.devices[{i}]"
            if not isinstance(dev, dict) or set(dev) != {"type", "id", "bus", "addr", "attrs"}:
                raise StreamError(f"{where}: expected an object with type, id, bus, addr, attrs")
            attrs = dev["attrs"]
            if not isinstance(attrs, dict) or len(attrs) > 64:
                raise StreamError(f"{where}.attrs: expected an object of at most 64 strings")
            dev_id = _check_id(f"{where}.id", dev["id"])
            if dev_id in seen:
                raise StreamError(f"{where}: duplicate device id {dev_id!r}")
            seen.add(dev_id)
            devices.append(DeviceFingerprint(
                type=_check_id(f"{where}.type", dev["type"]),
                id=dev_id,
                bus=_check_str(f"{where}.bus", dev["bus"], allow_empty=True),
                addr=_check_str(f"{where}.addr", dev["addr"], allow_empty=True),
                attrs={_check_str(f"{where}.attrs key", k): _check_str(f"{where}.attrs.{printable(k)}", v,
                                                                       allow_empty=True)
                       for k, v in attrs.items()},
            ))
        return cls(arch, machine, vcpus, memory, tuple(devices), tsc_hz)


def _check_tsc_hz(arch: str, value: Any) -> int:
    """CONFIG's optional ``tsc_hz``: x86_64 only, a rate :mod:`hv.cpuid` can declare."""
    if arch != "x86_64":
        raise StreamError(f"config.tsc_hz: a {printable(arch)[:40]} guest has no TSC")
    problem = tsc_hz_problem(value)
    if problem is not None:
        raise StreamError(f"config.tsc_hz: {problem}")
    return int(value)


def _check_str(name: str, value: Any, *, allow_empty: bool = False, limit: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > limit or (not value and not allow_empty):
        kind = "string" if allow_empty else "non-empty string"
        raise StreamError(f"{name}: expected a {kind} of at most {limit} characters")
    return value


def _check_id(name: str, value: Any) -> str:
    """Device ids and types follow the -device/-drive id rule (hv.devconfig.ID_RE): a
    stream that names a device any other way is invalid input, refused before comparison
    (and before its text could reach an error line)."""
    if not isinstance(value, str) or not ID_RE.match(value):
        shown = f"'{printable(value)}'" if isinstance(value, str) else type(value).__name__
        raise StreamError(f"{name}: {shown[:80]} is not a valid device id (a letter, then letters, "
                          "digits, '_', '.', '-'; at most 64)")
    return value


def _check_uint(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StreamError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")
    return value


def _size_text(size: int) -> str:
    if size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    return f"{size} bytes"


def compare_fingerprints(source: Fingerprint | dict[str, Any],
                         dest: Fingerprint | dict[str, Any]) -> list[str]:
    """Every difference between two configurations, one human-readable line each.

    Every field is shown through :func:`hv.textsafe.printable`: one side came from a peer.
    """
    src = source if isinstance(source, Fingerprint) else Fingerprint.from_dict(source)
    dst = dest if isinstance(dest, Fingerprint) else Fingerprint.from_dict(dest)
    p = printable
    out: list[str] = []
    if src.arch != dst.arch:
        out.append(f"architecture mismatch: source {p(src.arch)}, destination {p(dst.arch)}")
    if src.machine != dst.machine:
        out.append(f"machine type mismatch: source {p(src.machine)}, destination {p(dst.machine)}")
    if src.vcpus != dst.vcpus:
        out.append(f"vCPU count mismatch: source {src.vcpus}, destination {dst.vcpus}")
    if src.memory != dst.memory:
        out.append(f"memory size mismatch: source {_size_text(src.memory)}, "
                   f"destination {_size_text(dst.memory)}")
    dst_devices = {d.id: d for d in dst.devices}
    src_ids = set()
    for s in src.devices:
        src_ids.add(s.id)
        d = dst_devices.get(s.id)
        name = f"{p(s.id)} ({p(s.type)})"
        if d is None:
            out.append(f"device {name} present on the source but not on the destination")
            continue
        if s.type != d.type:
            out.append(f"device {p(s.id)} type mismatch: source {p(s.type)}, destination {p(d.type)}")
            continue
        if (s.bus, s.addr) != (d.bus, d.addr):
            out.append(f"device {name} bus/addr mismatch: source {p(s.bus) or '-'}/{p(s.addr) or '-'}, "
                       f"destination {p(d.bus) or '-'}/{p(d.addr) or '-'}")
        for key in sorted(set(s.attrs) | set(d.attrs)):
            sv, dv = s.attrs.get(key), d.attrs.get(key)
            if sv != dv:
                out.append(f"device {name} {p(key)} mismatch: source "
                           f"{'(unset)' if sv is None else repr(sv)}, destination "
                           f"{'(unset)' if dv is None else repr(dv)}")
    for d in dst.devices:
        if d.id not in src_ids:
            out.append(f"device {p(d.id)} ({p(d.type)}) present on the destination but not on the source")
    return out
