"""PIT, RTC and i8042 wired into q35: interrupt routing on the timer thread, a guest that
reboots through the 8042, the RTC across a live migration between two hv processes,
and streams from an hv without these devices."""
from __future__ import annotations

import calendar
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hv_backends import backend_class
from hv.config import parse_args
from hv.console import BufferSink
from hv.devices.clock import GuestClock
from hv.devices.ioapic import IOREGSEL, IOWIN
from hv.devices.lapic import REG_SVR
from hv.devices.rtc import NS_PER_S
from hv.machine import Machine
from hv.machine.interrupts import InterruptController
from hv.machine.legacy import LEGACY_DEVICE_IDS, build_legacy_devices
from hv.migration.stream import DeviceSection, FileChannel, StreamKind, StreamReader
from tests.helpers import Vm, requires_kvm
from tests.boot.kernels import make_elf, multiboot_header

SERIAL_B = bytes.fromhex("66baf803") + b"\xb0B\xee" + b"\xb0\x0a\xee"      # mov dx,0x3f8; "B\n"
SERIAL_R = bytes.fromhex("66baf803") + b"\xb0R\xee" + b"\xb0\x0a\xee"
KBC_RESET = bytes.fromhex("b0fee664")                                     # mov al,0xfe; out 0x64,al
HALT = bytes.fromhex("faf4ebfd")                                          # cli; hlt; jmp hlt


def rtc_write(index: int, value: int) -> bytes:
    return bytes([0xB0, index, 0xE6, 0x70, 0xB0, value, 0xE6, 0x71])


# Set the RTC (binary, 24 h) to 2099 the way hwclock does: SET, write, clear SET.
SET_2099 = rtc_write(0x0B, 0x86) + rtc_write(0x09, 99) + rtc_write(0x32, 20) + rtc_write(0x0B, 0x06)


def guest_elf(tmp_path: Path, name: str, code: bytes) -> Path:
    """A multiboot ELF running ``code`` (32-bit protected mode) right after its header."""
    path = tmp_path / name
    path.write_bytes(make_elf(is64=False, machine=3, entry=0x10000C,
                              segments=[(0x100000, multiboot_header() + code, 0x1000)]))
    return path


class FakeHost:
    """Host monotonic nanoseconds for a guest clock, moved by the test."""

    def __init__(self) -> None:
        self.ns = 0

    def now(self) -> int:
        return self.ns


def test_pit_irq0_reaches_gsi2_and_rtc_irq8_reaches_gsi8_on_the_timer_thread_poll() -> None:
    lock = threading.RLock()
    host = FakeHost()
    irq = InterruptController(1, lock, threading.Condition(lock), lambda index: None, lambda: True,
                              lambda: False, clock=GuestClock(host.now))
    irq.lapics[0].write(REG_SVR, 4, 0x1FF)
    devices = {d.name: d for d in build_legacy_devices(irq, lambda: None)}
    for pin, vector in ((2, 0x30), (8, 0x38), (1, 0x31)):
        irq.ioapic.write(IOREGSEL, 4, 0x10 + 2 * pin)
        irq.ioapic.write(IOWIN, 4, vector)                # edge, fixed, to APIC 0
    pit = devices["pit"].device
    with lock:
        irq.sync_clock()
        pit.write(3, 1, 0x34)                             # periodic, 1000 counts
        pit.write(0, 1, 1000 & 0xFF)
        pit.write(0, 1, 1000 >> 8)
        assert irq.poll() == pytest.approx(1000 / 1_193_182, rel=1e-3)
        assert irq.lapics[0].deliverable() is None
        host.ns += 1_000_000
        irq.poll()
        assert irq.lapics[0].deliverable() == 0x30
        irq.lapics[0].acknowledge(0x30)
        rtc = devices["rtc"].device
        rtc.write(0, 1, 0x0B)
        rtc.write(1, 1, 0x42)                             # periodic interrupt enable
        host.ns += 1_000_000
        irq.poll()
        assert irq.lapics[0].s.irr >> 0x38 & 1 and irq.lapics[0].s.irr >> 0x30 & 1
        kbc = devices["i8042"].device
        kbc.write(0, 1, 0xFF)                             # keyboard reset: 0xFA on IRQ 1
        assert irq.lapics[0].s.irr >> 0x31 & 1


@pytest.mark.parametrize("accel", ["unicorn", pytest.param("kvm", marks=requires_kvm)])
def test_guest_reset_through_the_8042_reboots_with_a_guest_reset_event(tmp_path: Path, accel: str) -> None:
    kernel = guest_elf(tmp_path, "reset.elf", SERIAL_B + KBC_RESET + HALT)
    config = parse_args(["-machine", "q35", "-m", "64", "-kernel", str(kernel)]).config
    console = BufferSink()
    machine = Machine(config, backend_class(accel)(), console)
    events: list[tuple[str, dict | None]] = []
    machine.add_listener(lambda name, data: events.append((name, data)))
    machine.load_kernel(kernel.read_bytes())
    machine.start()
    try:
        deadline = time.monotonic() + 60
        while sum(1 for name, _ in events if name == "RESET") < 2 or console.getvalue().count(b"B\n") < 3:
            assert time.monotonic() < deadline, (events, console.getvalue())
            time.sleep(0.01)
    finally:
        machine.close()
    resets = [data for name, data in events if name == "RESET"]
    assert all(data == {"guest": True, "reason": "guest-reset"} for data in resets)
    assert console.getvalue().startswith(b"B\nB\nB\n")


def test_stream_without_legacy_devices_still_loads(tmp_path: Path) -> None:
    kernel = guest_elf(tmp_path, "halt.elf", HALT)
    config = parse_args(["-machine", "q35", "-m", "64", "-kernel", str(kernel)]).config
    source = Machine(config, backend_class("unicorn")(), BufferSink())
    target = Machine(config, backend_class("unicorn")(), BufferSink())
    try:
        snapshot = source.save()
        for name in LEGACY_DEVICE_IDS:
            del snapshot.devices[name]
        old = dict(snapshot.fingerprint, devices=[d for d in snapshot.fingerprint["devices"]
                                                  if d["id"] not in LEGACY_DEVICE_IDS])
        assert target.fingerprint(source=old) == old
        assert {d["id"] for d in target.fingerprint()["devices"]} >= set(LEGACY_DEVICE_IDS)
        target.restore(snapshot)
        del snapshot.devices["serial0"]
        with pytest.raises(ValueError, match="differ from machine devices"):
            target.restore(snapshot)
    finally:
        source.close()
        target.close()


def rtc_state(snapshot_dir: Path) -> dict:
    with open(snapshot_dir / "state", "rb") as state:
        reader = StreamReader(FileChannel(state), page_count=(64 << 20) // 4096, kind=StreamKind.STATE,
                              arch="x86_64")
        sections = [s for s in reader.read_all() if isinstance(s, DeviceSection)]
    by_name = {s.name: s.state for s in sections}
    assert {"pit", "i8042"} <= set(by_name)
    return {"rtc": by_name["rtc"], "clock": by_name["clock"]}


def test_rtc_time_set_by_the_guest_survives_live_migration_and_never_goes_back(hv, tmp_path: Path) -> None:
    """The guest sets its RTC to 2099 (far ahead of any host). Read back from file
    snapshots of the source before and of the destination after a live migration, the
    wall clock moved forward by exactly the guest time that passed: it followed the guest
    clock, not the destination's host clock (which is ~73 years behind)."""
    kernel = guest_elf(tmp_path, "rtc.elf", SET_2099 + SERIAL_R + HALT)
    common = ("-machine", "q35", "-accel", "unicorn", "-m", "64", "-kernel", str(kernel))
    with tempfile.TemporaryDirectory(prefix="hvl") as sock_dir:
        src = Vm(hv, sock_dir, "src", *common)
        dst = Vm(hv, sock_dir, "dst", *common, "-incoming", f"unix:{os.path.join(sock_dir, 'dst.mig')}")
        try:
            src.process.wait_output("R\n")
            assert src.execute("migrate", uri=f"file:{tmp_path / 'before'}") == {"return": {}}
            assert src.wait_migration()["status"] == "completed"
            assert src.execute("cont") == {"return": {}}
            time.sleep(0.2)                               # let guest time pass on the source
            assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
            assert src.wait_migration()["status"] == "completed"
            assert dst.wait_migration()["status"] == "completed"
            time.sleep(0.2)
            assert dst.execute("migrate", uri=f"file:{tmp_path / 'after'}") == {"return": {}}
            assert dst.wait_migration()["status"] == "completed"
        finally:
            src.close()
            dst.close()
    before, after = rtc_state(tmp_path / "before"), rtc_state(tmp_path / "after")
    # The wall clock at the moment each snapshot's guest clock stopped (the RTC's anchor
    # is "wall_ns at guest_ns", taken at most a few microseconds before that).
    wall_before, wall_after = (s["rtc"]["wall_ns"] + s["clock"]["ns"] - s["rtc"]["guest_ns"] for s in (before, after))
    year_2099 = calendar.timegm((2099, 1, 1, 0, 0, 0)) * NS_PER_S
    assert year_2099 <= wall_before < wall_after < calendar.timegm((2100, 1, 1, 0, 0, 0)) * NS_PER_S
    assert wall_after - wall_before == after["clock"]["ns"] - before["clock"]["ns"] >= 200_000_000
