"""Device and vCPU states are saved with hv.devices.persist.plain_dict, a faster
dataclasses.asdict (a migration saves them with the guest paused): it must give exactly
what asdict gives, for every state type of every machine, so the stream's JSON is
unchanged."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest

from hv.devices.persist import plain_dict
from hv_fixtures import guest
from tests.helpers import GUESTS, machine_in_process


@dataclasses.dataclass
class _Inner:
    count: int
    name: str


@dataclasses.dataclass
class _Outer:
    values: list[int]
    pair: tuple[int, int]
    table: dict[int, list[int]]
    inners: list[_Inner]
    one: _Inner
    maybe: int | None
    raw: bytes
    ratio: float


def _same(state: Any) -> None:
    fast, reference = plain_dict(state), dataclasses.asdict(state)
    assert fast == reference
    assert repr(fast) == repr(reference)   # same container types (list vs tuple), same order


def test_plain_dict_equals_asdict_and_copies() -> None:
    state = _Outer([1, 2], (3, 4), {5: [6]}, [_Inner(7, "a")], _Inner(8, "b"), None, b"\x01", 0.5)
    _same(state)
    copied = plain_dict(state)
    copied["values"].append(9)
    copied["table"][5].append(10)
    copied["inners"][0]["count"] = 11
    assert state.values == [1, 2] and state.table == {5: [6]} and state.inners[0].count == 7


def _options(machine_type: str, tmp_path: Path) -> list[str]:
    """q35 with a root port and a virtio-blk behind it, so their states are covered too."""
    if machine_type != "q35":
        return []
    image = tmp_path / "d1.img"
    image.write_bytes(bytes(1 << 20))
    return ["-device", "pcie-root-port,port=0x2,addr=0x2,bus=pcie.0,id=pcie.2",
            "-drive", f"file={image},if=none,id=d1", "-device", "virtio-blk-pci,drive=d1,id=b1,bus=pcie.2"]


@pytest.mark.parametrize(("machine_type", "arch", "accel"), GUESTS)
def test_every_saved_device_state_is_what_asdict_gives(machine_type: str, arch: str, accel: str,
                                                        tmp_path: Path) -> None:
    machine, _ = machine_in_process(machine_type, accel, guest(arch, "dirty"), "mib=4",
                                    *_options(machine_type, tmp_path))
    try:
        machine.start()
        time.sleep(0.2)   # the guest changes its devices' states a little
        machine.pause()
        kinds = set()
        with machine.device_manager.run.lock:
            for slot in machine.devices.values():
                state = slot.device.save()
                kinds.add(type(state).__name__)
                _same(state)
                assert json.dumps(state.to_dict(), sort_keys=True) is not None
        assert len(kinds) >= 5, kinds
        for cpu in machine.save().cpus:   # and the vCPU states (hv.state.state_to_dict)
            _same(cpu)
    finally:
        machine.close()
