"""Device state versions (hv.devices.persist): every state type declares VERSION and
MIN_VERSION; restore reads any version in [MIN_VERSION, VERSION] and refuses the others
with one line naming the device, the version and the range; nothing changes on a refusal.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, ClassVar

import pytest

from hv.config import parse_args
from hv.console import BufferSink
from hv.devices.persist import check_version, restore_state, state_record
from hv.errors import DeviceStateError
from hv.machine import Machine
from hv_backends import backend_class
from tests.helpers import ROOT


DEVICES = ROOT / "hv" / "devices"

#: (state type name, older version) -> a state of that older layout, as an older hv saved it.
#: Every version in [MIN_VERSION, VERSION) of every state type needs one (see
#: test_every_older_version_has_a_sample): raising VERSION means adding the old layout here.
OLDER_LAYOUTS: dict[tuple[str, int], dict[str, Any]] = {}


def state_types() -> dict[str, type]:
    """Every versioned device state type of hv/devices, by qualified name."""
    found = {}
    for path in sorted(DEVICES.glob("*.py")):
        module = importlib.import_module(f"hv.devices.{path.stem}")
        for _name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and dataclasses.is_dataclass(cls) and "VERSION" in vars(cls):
                found[f"{module.__name__}.{cls.__qualname__}"] = cls
    return found


TYPES = state_types()


def test_state_types_were_found():
    names = {name.rsplit(".", 1)[1] for name in TYPES}
    assert {"SerialState", "PcieRootPortState", "VirtioPciState", "GicState", "LapicState", "RtcState"} <= names


@pytest.mark.parametrize("name", sorted(TYPES))
def test_state_type_declares_its_versions(name):
    cls = TYPES[name]
    for attr in ("VERSION", "MIN_VERSION"):
        value = vars(cls).get(attr)
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, (name, attr, value)
    assert cls.MIN_VERSION <= cls.VERSION
    if cls.MIN_VERSION < cls.VERSION:
        assert inspect.ismethod(getattr(cls, "upgrade", None)), f"{name} reads older layouts: needs upgrade()"


@pytest.fixture(scope="module", params=["q35", "virt"])
def machine(request, tmp_path_factory):
    kernel = tmp_path_factory.mktemp("k") / "kernel"
    kernel.write_bytes(b"\x7fELF")
    built = Machine(parse_args(["-machine", request.param, "-kernel", str(kernel)]).config,
                    backend_class("unicorn")(), BufferSink())
    yield built
    built.close()


def test_current_version_round_trips(machine):
    """Each device's state, as the machine saves it, loads back through restore_state."""
    seen = set()
    for name, record in machine.save().devices.items():
        cls = machine.devices[name].state_type
        seen.add(cls)
        state = restore_state(cls, record, f"device {name}")
        assert state_record(state) == record
    assert seen <= set(TYPES.values())


def test_every_older_version_has_a_sample_and_it_loads():
    """Each supported older layout (today none: every device is at version 1) has a
    sample, and it loads into the current type."""
    by_name = {name.rsplit(".", 1)[1]: cls for name, cls in TYPES.items()}
    wanted = {(short, v) for short, cls in by_name.items() for v in range(cls.MIN_VERSION, cls.VERSION)}
    assert wanted == set(OLDER_LAYOUTS)
    for (short, version), raw in OLDER_LAYOUTS.items():
        state = restore_state(by_name[short], {"version": version, "state": raw}, f"device {short}")
        assert isinstance(state, by_name[short])


@pytest.mark.parametrize("name", sorted(TYPES))
def test_versions_outside_the_range_are_refused(name):
    cls = TYPES[name]
    record = {"version": cls.VERSION, "state": {}}   # refused before the state is read
    low, high = cls.MIN_VERSION, cls.VERSION
    supported = f"{low}" if low == high else f"{low}-{high}"
    for bad in (high + 1, low - 1, 0, -1, 1 << 40):
        with pytest.raises(DeviceStateError) as info:
            restore_state(cls, dict(record, version=bad), "device dev0")
        assert str(info.value) == f"device dev0: unsupported state version {bad} (this hv reads version {supported})"
    for bad in ("1", True, None, 1.0, [1]):
        with pytest.raises(DeviceStateError, match=f"device dev0: unsupported state version {type(bad).__name__} "):
            restore_state(cls, dict(record, version=bad), "device dev0")
    with pytest.raises(DeviceStateError, match="device dev0: a saved state is"):
        restore_state(cls, [record], "device dev0")


@dataclasses.dataclass
class CounterState:
    """A state type with a history, as a device gets one: v1 had ``count`` only, v2 added
    ``limit``, v3 (current) renamed ``count`` to ``value``; v1 is no longer read."""

    value: int = 0
    limit: int = 16

    VERSION: ClassVar[int] = 3
    MIN_VERSION: ClassVar[int] = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> CounterState:
        if not isinstance(raw, dict) or set(raw) != {"value", "limit"}:
            raise DeviceStateError("counter state: wrong fields")
        return cls(raw["value"], raw["limit"])

    @classmethod
    def upgrade(cls, raw: Any, version: int) -> Any:
        assert version == 2
        if not isinstance(raw, dict) or set(raw) != {"count", "limit"}:
            raise DeviceStateError("counter state v2: wrong fields")
        return {"value": raw["count"], "limit": raw["limit"]}


def test_an_older_supported_layout_is_upgraded_and_checked():
    assert restore_state(CounterState, {"version": 2, "state": {"count": 5, "limit": 9}}, "c") == CounterState(5, 9)
    assert restore_state(CounterState, {"version": 3, "state": {"value": 5, "limit": 9}}, "c") == CounterState(5, 9)
    with pytest.raises(DeviceStateError, match="counter state v2: wrong fields"):
        restore_state(CounterState, {"version": 2, "state": {"value": 5, "limit": 9}}, "c")
    with pytest.raises(DeviceStateError, match=r"^c: unsupported state version 1 \(this hv reads version 2-3\)$"):
        restore_state(CounterState, {"version": 1, "state": {"count": 5}}, "c")
    with pytest.raises(DeviceStateError, match=r"^c: unsupported state version 4 \(this hv reads version 2-3\)$"):
        restore_state(CounterState, {"version": 4, "state": {"value": 5, "limit": 9}}, "c")
    assert check_version(CounterState, 2, "c") == 2


def test_machine_restore_refuses_a_bad_version_and_changes_nothing(machine):
    snapshot = machine.save()
    for name, record in snapshot.devices.items():
        for bad in (record["version"] + 1, 0):
            forged = dataclasses.replace(snapshot, devices={**snapshot.devices, name: dict(record, version=bad)})
            with pytest.raises(DeviceStateError, match=f"^device {name}: unsupported state version {bad} "):
                machine.restore(forged)
    assert machine.save().devices == snapshot.devices
    machine.restore(snapshot)   # the versions it wrote itself load
