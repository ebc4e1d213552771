"""The 8254 PIT as a register file on a guest clock a test moves by hand."""
from __future__ import annotations

import json
import logging

import pytest

from hv.devices.interfaces import DeviceStateError
from hv.devices.pit import NS_PER_S, PIT_HZ, Pit, PitState
from tests.devices.conftest import RecordingLine, StepClock

CH0, CH2, CTRL = 0, 2, 3


class PitClock(StepClock):
    """Guest nanoseconds that move only when the test says, in PIT input clocks too."""

    def advance_ticks(self, ticks: int) -> None:
        """Move to just past ``ticks`` more input clocks (from a tick boundary)."""
        self.ns += -(-ticks * NS_PER_S // PIT_HZ)


def make() -> tuple[Pit, PitClock, RecordingLine, list[int]]:
    clock, line, changes = PitClock(1_000_000), RecordingLine(), []
    pit = Pit(clock, line, lambda: changes.append(1))
    return pit, clock, line, changes


def ticks_ns(ticks: int) -> int:
    return -(-ticks * NS_PER_S // PIT_HZ)


def write_word(pit: Pit, port: int, value: int) -> None:
    """Low then high byte, as Linux writes a lo/hi count (a 16-bit out would hit two ports)."""
    pit.write(port, 1, value & 0xFF)
    pit.write(port, 1, value >> 8)


def read_word(pit: Pit, port: int) -> int:
    low = pit.read(port, 1)
    return low | pit.read(port, 1) << 8


def test_channel2_mode0_calibration_as_linux_polls_it() -> None:
    """pit_calibrate_tsc: gate high, 0xB0, a 50 ms latch; port 0x61 bit 5 rises at the end.
    quick_pit_calibrate reads the live count low/high and watches the MSB fall."""
    pit, clock, _, _ = make()
    port61 = pit.port61()
    port61.write(0, 1, (port61.read(0, 1) & ~0x02) | 0x01)
    pit.write(CTRL, 1, 0xB0)
    latch = PIT_HZ // 20
    pit.write(CH2, 1, latch & 0xFF)
    pit.write(CH2, 1, latch >> 8)
    assert not port61.read(0, 1) & 0x20
    clock.advance_ticks(latch - 1)
    assert not port61.read(0, 1) & 0x20 and read_word(pit, CH2) == 1
    clock.advance_ticks(1)
    assert port61.read(0, 1) & 0x20
    # quick_pit_calibrate: start at 0xFFFF, the MSB goes down by one every 256 ticks.
    pit.write(CTRL, 1, 0xB0)
    pit.write(CH2, 1, 0xFF)
    pit.write(CH2, 1, 0xFF)
    msbs = []
    for _ in range(4):
        pit.read(CH2, 1)
        msbs.append(pit.read(CH2, 1))
        clock.advance_ticks(256)
    assert msbs == [0xFF, 0xFE, 0xFD, 0xFC]


def test_mode2_periodic_irq0_on_the_timer_deadline() -> None:
    pit, clock, line, changes = make()
    pit.write(CTRL, 1, 0x34)                         # Linux's periodic clockevent
    pit.write(CH0, 1, 1193 & 0xFF)
    assert pit.timer_deadline is None                # half a count: not counting yet
    pit.write(CH0, 1, 1193 >> 8)
    start = clock.ns
    assert changes and pit.timer_deadline == start + ticks_ns(1193)
    assert not pit.poll_timer(pit.timer_deadline - 1) and line.levels == []
    clock.ns = pit.timer_deadline
    assert pit.poll_timer(clock.ns) and line.levels == [True, False]
    assert pit.timer_deadline == start + ticks_ns(2 * 1193)
    clock.ns = start + ticks_ns(10 * 1193) + 5       # a stall: one pulse, then back in phase
    assert pit.poll_timer(clock.ns) and line.levels == [True, False] * 2
    assert pit.timer_deadline == start + ticks_ns(11 * 1193)
    # OUT is low for exactly the last tick of each period, the count runs N..1.
    clock.ns = start + ticks_ns(11 * 1193 - 1)
    assert not pit.out(0, clock.ns) and pit.count(0, clock.ns) == 1
    clock.ns = start + ticks_ns(11 * 1193)
    assert pit.out(0, clock.ns) and pit.count(0, clock.ns) == 1193 & 0xFFFF


def test_mode4_one_shot_fires_once_and_control_word_stops_counter0() -> None:
    pit, clock, line, _ = make()
    pit.write(CTRL, 1, 0x38)                         # Linux's one-shot clockevent
    write_word(pit, CH0, 500)
    deadline = pit.timer_deadline
    assert deadline == clock.ns + ticks_ns(501)
    clock.ns = deadline
    assert pit.poll_timer(clock.ns) and pit.timer_deadline is None
    clock.ns += NS_PER_S
    assert not pit.poll_timer(clock.ns) and line.levels == [True, False]
    write_word(pit, CH0, 1000)
    assert pit.timer_deadline is not None
    pit.write(CTRL, 1, 0x30)                         # shutdown: mode 0, no count
    assert pit.timer_deadline is None and not pit.out(0, clock.ns)


def test_mode3_square_wave() -> None:
    pit, clock, _, _ = make()
    pit.write(CTRL, 1, 0x36)
    write_word(pit, CH0, 100)
    outs = []
    for _ in range(4):
        outs.append((pit.out(0, clock.ns), pit.count(0, clock.ns)))
        clock.advance_ticks(25)
    assert outs == [(True, 100), (True, 50), (False, 100), (False, 50)]
    assert pit.timer_deadline is not None


def test_counter_latch_readback_and_status() -> None:
    pit, clock, _, _ = make()
    pit.write(CTRL, 1, 0xB4)                         # counter 2, lo/hi, mode 2
    status_before_count = None
    pit.write(CTRL, 1, 0xE8)                         # read-back: status of counter 2
    status_before_count = pit.read(CH2, 1)
    assert status_before_count == 0x80 | 0x40 | 0x30 | 0x04      # OUT high, null count, lo/hi, mode 2
    pit.port61().write(0, 1, 1)
    write_word(pit, CH2, 1000)
    clock.advance_ticks(10)
    pit.write(CTRL, 1, 0x80)                         # latch counter 2
    clock.advance_ticks(300)
    pit.write(CTRL, 1, 0x80)                         # a second latch waits for the first
    assert read_word(pit, CH2) == 990
    assert read_word(pit, CH2) == 690                # live again
    pit.write(CTRL, 1, 0xC8)                         # read-back count + status: status first
    clock.advance_ticks(100)
    assert pit.read(CH2, 1) == 0x80 | 0x30 | 0x04
    assert read_word(pit, CH2) == 690
    pit.write(CTRL, 1, 0xA0)                         # counter 2, high byte only, mode 0
    pit.write(CH2, 1, 0x12)
    assert pit.read(CH2, 1) == 0x12 and pit.read(CH2, 1) == 0x12
    pit.write(CTRL, 1, 0x90)                         # low byte only
    pit.write(CH2, 1, 0x34)
    clock.advance_ticks(4)
    assert pit.read(CH2, 1) == 0x30
    assert pit.read(CTRL, 1) == 0                    # write-only


def test_gate_suspends_mode0_and_reloads_mode2() -> None:
    pit, clock, _, _ = make()
    port61 = pit.port61()
    pit.write(CTRL, 1, 0xB0)
    write_word(pit, CH2, 1000)                          # gate low: loaded, not counting
    clock.advance_ticks(100)
    assert read_word(pit, CH2) == 1000
    port61.write(0, 1, 1)
    clock.advance_ticks(100)
    port61.write(0, 1, 0)
    clock.advance_ticks(500)
    assert read_word(pit, CH2) == 900
    port61.write(0, 1, 1)
    clock.advance_ticks(50)
    assert read_word(pit, CH2) == 850
    pit.write(CTRL, 1, 0xB4)
    write_word(pit, CH2, 100)
    clock.advance_ticks(99)
    assert not pit.out(2, clock.ns)
    port61.write(0, 1, 0)                            # gate low: OUT high at once
    assert port61.read(0, 1) & 0x20
    port61.write(0, 1, 1)                            # rising edge: reload
    clock.advance_ticks(10)
    assert read_word(pit, CH2) == 90
    pit.write(CTRL, 1, 0xB2)                         # mode 1 waits for a gate edge
    write_word(pit, CH2, 50)
    clock.advance_ticks(20)
    assert read_word(pit, CH2) == 50 and pit.out(2, clock.ns)
    port61.write(0, 1, 0)
    port61.write(0, 1, 1)
    clock.advance_ticks(20)
    assert read_word(pit, CH2) == 30 and not pit.out(2, clock.ns)


def test_port61_bits() -> None:
    pit, clock, _, _ = make()
    port61 = pit.port61()
    port61.write(0, 1, 0xFF)
    assert port61.read(0, 1) & 0x0F == 0x0F and not port61.read(0, 1) & 0xC0
    seen = set()
    for _ in range(4):
        seen.add(port61.read(0, 1) & 0x10)
        clock.ns += 15_085
    assert seen == {0, 0x10}


def test_bcd_is_reported_and_counts_binary(caplog: pytest.LogCaptureFixture) -> None:
    pit, clock, _, _ = make()
    with caplog.at_level(logging.WARNING):
        pit.write(CTRL, 1, 0xB1)
    assert "BCD counting is not supported" in caplog.text
    pit.port61().write(0, 1, 1)
    write_word(pit, CH2, 0x1000)
    clock.advance_ticks(1)
    assert read_word(pit, CH2) == 0x0FFF
    pit.write(CTRL, 1, 0xE8)
    assert pit.read(CH2, 1) & 1


def test_save_restore_continues_mid_count_on_another_device() -> None:
    pit, clock, _, _ = make()
    pit.write(CTRL, 1, 0x34)
    write_word(pit, CH0, 5000)
    pit.write(CTRL, 1, 0xB0)
    pit.write(CH2, 1, 0x34)                          # half a lo/hi write
    clock.advance_ticks(1234)
    pit.write(CTRL, 1, 0x00)                         # latched, not yet read
    state = PitState.from_dict(json.loads(json.dumps(pit.save().to_dict())))
    other, other_clock, line, changes = make()
    other_clock.ns = clock.ns
    other.restore(state)
    assert changes and other.timer_deadline == pit.timer_deadline
    assert read_word(other, CH0) == 5000 - 1234
    other.write(CH2, 1, 0x12)                        # the high byte completes the count
    assert other.s.channels[2].reload == 0x1234
    other_clock.ns = other.timer_deadline
    assert other.poll_timer(other_clock.ns) and line.levels == [True, False]
    other.restore(PitState())                        # reset: nothing counts
    assert other.timer_deadline is None


@pytest.mark.parametrize("mutate", [
    lambda raw: raw.pop("port61"),
    lambda raw: raw.update(port61=16),
    lambda raw: raw.update(channels=raw["channels"][:2]),
    lambda raw: raw["channels"][0].update(mode=6),
    lambda raw: raw["channels"][0].update(reload=0x10000),
    lambda raw: raw["channels"][1].update(latch=[1, 2, 3]),
    lambda raw: raw["channels"][1].update(latch=[256]),
    lambda raw: raw["channels"][2].update(running=1),
    lambda raw: raw["channels"][2].update(paused_ns=-1),
    lambda raw: raw["channels"][2].update(status_latch="x"),
    lambda raw: raw["channels"][2].update(extra=1),
])
def test_bad_state_is_refused(mutate) -> None:
    raw = PitState().to_dict()
    mutate(raw)
    with pytest.raises(DeviceStateError):
        PitState.from_dict(raw)
