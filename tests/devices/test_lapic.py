"""Local APIC register semantics and timer, against a fake host clock."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from hv.devices.clock import ClockState, GuestClock
from hv.devices.interfaces import DeviceStateError
from hv.devices.lapic import (LVT_MASKED, REG_EOI, REG_ESR, REG_ICR_HI, REG_ICR_LO, REG_ID, REG_IRR, REG_ISR,
                              REG_LDR, REG_LVT_TIMER, REG_PPR, REG_SVR, REG_TIMER_CURRENT, REG_TIMER_DIVIDE,
                              REG_TIMER_INITIAL, REG_TMR, REG_TPR, REG_VERSION, Lapic, LapicState)


class FakeHost:
    """Records what the APIC asks of its interrupt controller."""

    def __init__(self) -> None:
        self.irq_changes = 0
        self.timer_changes = 0
        self.eois: list[int] = []
        self.ipis: list[tuple[int, int, int]] = []

    def irq_changed(self, index: int) -> None:
        self.irq_changes += 1

    def timer_changed(self) -> None:
        self.timer_changes += 1

    def eoi_broadcast(self, vector: int) -> None:
        self.eois.append(vector)

    def send_ipi(self, source: int, icr_lo: int, icr_hi: int) -> None:
        self.ipis.append((source, icr_lo, icr_hi))


class FakeTime:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns


def make(index: int = 0) -> tuple[Lapic, FakeHost, FakeTime, GuestClock]:
    host_time = FakeTime()
    clock = GuestClock(host_time)
    clock.set_running(True)
    host = FakeHost()
    lapic = Lapic(index, clock, host)
    lapic.write(REG_SVR, 4, 0x1FF)
    return lapic, host, host_time, clock


def test_reset_values_and_identity() -> None:
    lapic = Lapic(3, GuestClock(FakeTime()), FakeHost())
    assert lapic.read(REG_ID, 4) == 3 << 24
    assert lapic.read(REG_VERSION, 4) == 0x00060014
    assert lapic.read(REG_SVR, 4) == 0xFF
    assert lapic.read(REG_LVT_TIMER, 4) == LVT_MASKED
    assert lapic.read(REG_ID + 3, 1) == 3 and lapic.read(REG_ID + 4, 4) == 0
    lapic.write(REG_ID, 4, 7 << 24)
    assert lapic.apic_id == 7 and lapic.read(REG_ID, 4) == 7 << 24
    # Software-disabled: fixed interrupts are not accepted, LVT writes stay masked.
    assert not lapic.accept(0x40)
    lapic.write(REG_LVT_TIMER, 4, 0x40)
    assert lapic.read(REG_LVT_TIMER, 4) == 0x40 | LVT_MASKED
    # Partial or misaligned writes are ignored.
    lapic.write(REG_TPR, 1, 0x50)
    lapic.write(REG_TPR + 4, 4, 0x50)
    assert lapic.read(REG_TPR, 4) == 0


def test_priority_irr_isr_and_eoi() -> None:
    lapic, host, _, _ = make()
    assert lapic.accept(0x41) and lapic.accept(0x95) and lapic.accept(0x30)
    assert lapic.read(REG_IRR + 0x20, 4) == 1 << 1 and lapic.read(REG_IRR + 0x40, 4) == 1 << 0x15
    assert lapic.deliverable() == 0x95
    lapic.acknowledge(0x95)
    assert lapic.read(REG_ISR + 0x40, 4) == 1 << 0x15 and lapic.read(REG_PPR, 4) == 0x90
    # Lower classes wait while 0x95 is in service, a higher one preempts.
    assert lapic.deliverable() is None
    lapic.accept(0xA0)
    assert lapic.deliverable() == 0xA0
    lapic.acknowledge(0xA0)
    # EOI retires the highest in-service vector first.
    lapic.write(REG_EOI, 4, 0)
    assert lapic.s.isr == 1 << 0x95 and lapic.deliverable() is None
    lapic.write(REG_EOI, 4, 0)
    assert lapic.s.isr == 0 and lapic.deliverable() == 0x41
    # TPR holds back classes at or below it.
    lapic.write(REG_TPR, 4, 0x40)
    assert lapic.deliverable() is None and lapic.read(REG_PPR, 4) == 0x40
    lapic.write(REG_TPR, 4, 0x3F)
    assert lapic.deliverable() == 0x41
    assert host.eois == []            # edge-triggered: no EOI broadcast
    with pytest.raises(ValueError):
        lapic.acknowledge(0x99)


def test_level_triggered_eoi_broadcast_and_suppression() -> None:
    lapic, host, _, _ = make()
    lapic.accept(0x51, level=True)
    assert lapic.read(REG_TMR + 0x20, 4) == 1 << 0x11
    lapic.acknowledge(0x51)
    lapic.write(REG_EOI, 4, 0)
    assert host.eois == [0x51]
    lapic.write(REG_SVR, 4, 0x11FF)   # suppress EOI broadcast
    lapic.accept(0x51, level=True)
    lapic.acknowledge(0x51)
    lapic.write(REG_EOI, 4, 0)
    assert host.eois == [0x51]


def test_illegal_vectors_set_esr() -> None:
    lapic, host, _, _ = make()
    assert not lapic.accept(5)
    assert lapic.read(REG_ESR, 4) == 0       # latched only by a write
    lapic.write(REG_ESR, 4, 0)
    assert lapic.read(REG_ESR, 4) == 0x40
    lapic.write(REG_ESR, 4, 0)
    assert lapic.read(REG_ESR, 4) == 0


def test_icr_write_sends_ipi() -> None:
    lapic, host, _, _ = make(1)
    lapic.write(REG_ICR_HI, 4, 0x02FF_FFFF)
    lapic.write(REG_ICR_LO, 4, 0x4061)
    assert host.ipis == [(1, 0x4061, 0x0200_0000)]
    assert lapic.read(REG_ICR_LO, 4) == 0x4061   # delivery status reads idle


def test_one_shot_timer_counts_down_and_fires_once() -> None:
    lapic, host, t, clock = make()
    lapic.write(REG_TIMER_DIVIDE, 4, 0x3)            # divide by 16
    lapic.write(REG_LVT_TIMER, 4, 0x40)              # one-shot, vector 0x40
    lapic.write(REG_TIMER_INITIAL, 4, 1000)          # 16 us
    start = clock.now()
    assert lapic.timer_deadline == start + 16_000
    assert lapic.read(REG_TIMER_CURRENT, 4) == 1000
    t.ns += 8_000
    assert lapic.read(REG_TIMER_CURRENT, 4) == 500
    assert not lapic.poll_timer(clock.now())
    t.ns += 8_000
    assert lapic.poll_timer(clock.now())
    assert lapic.deliverable() == 0x40 and lapic.timer_deadline is None
    assert lapic.read(REG_TIMER_CURRENT, 4) == 0
    t.ns += 100_000
    assert not lapic.poll_timer(clock.now())


def test_periodic_timer_coalesces_missed_periods_and_keeps_phase() -> None:
    lapic, host, t, clock = make()
    lapic.write(REG_TIMER_DIVIDE, 4, 0xB)            # divide by 1
    lapic.write(REG_LVT_TIMER, 4, 0x40 | 1 << 17)    # periodic
    lapic.write(REG_TIMER_INITIAL, 4, 1000)          # 1 us period
    start = clock.now()
    t.ns += 1_000
    assert lapic.poll_timer(clock.now()) and lapic.timer_deadline == start + 2_000
    lapic.acknowledge(0x40)
    lapic.write(REG_EOI, 4, 0)
    t.ns += 10_500                                   # ten periods late: one interrupt
    assert lapic.poll_timer(clock.now())
    assert lapic.timer_deadline == start + 12_000 and bin(lapic.s.irr).count("1") == 1
    assert lapic.read(REG_TIMER_CURRENT, 4) == 500
    # Masked: the timer keeps running, expiries are dropped.
    lapic.acknowledge(0x40)
    lapic.write(REG_EOI, 4, 0)
    lapic.write(REG_LVT_TIMER, 4, 0x40 | 1 << 17 | LVT_MASKED)
    t.ns += 1_000
    assert lapic.poll_timer(clock.now()) and lapic.s.irr == 0
    # Initial count 0 stops it.
    lapic.write(REG_TIMER_INITIAL, 4, 0)
    assert lapic.timer_deadline is None and lapic.read(REG_TIMER_CURRENT, 4) == 0


@pytest.mark.parametrize("code,divide", [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64),
                                         (0xA, 128), (0xB, 1)])
def test_divide_configuration(code: int, divide: int) -> None:
    lapic, _, t, clock = make()
    lapic.write(REG_TIMER_DIVIDE, 4, code)
    lapic.write(REG_LVT_TIMER, 4, 0x40)
    lapic.write(REG_TIMER_INITIAL, 4, 100)
    assert lapic.timer_deadline == clock.now() + 100 * divide
    t.ns += 10 * divide
    assert lapic.read(REG_TIMER_CURRENT, 4) == 90


def test_paused_clock_stops_the_timer() -> None:
    lapic, _, t, clock = make()
    lapic.write(REG_LVT_TIMER, 4, 0x40)
    lapic.write(REG_TIMER_DIVIDE, 4, 0xB)
    lapic.write(REG_TIMER_INITIAL, 4, 1000)
    t.ns += 400
    clock.set_running(False)
    t.ns += 10_000_000
    assert lapic.read(REG_TIMER_CURRENT, 4) == 600
    assert not lapic.poll_timer(clock.now())
    clock.set_running(True)
    t.ns += 600
    assert lapic.poll_timer(clock.now())


def test_state_round_trip_continues_the_timer_on_another_clock() -> None:
    lapic, _, t, clock = make(2)
    lapic.write(REG_LDR, 4, 0x0400_0000)
    lapic.write(REG_TIMER_DIVIDE, 4, 0xB)
    lapic.write(REG_LVT_TIMER, 4, 0x40 | 1 << 17)
    lapic.write(REG_TIMER_INITIAL, 4, 1000)
    lapic.accept(0x33)
    lapic.accept(0x41)
    lapic.acknowledge(0x41)
    t.ns += 250
    saved_clock = ClockState.from_dict(clock.save().to_dict())
    saved = LapicState.from_dict(lapic.save().to_dict())
    # Somewhere else, where the host clock reads something entirely different.
    other_time = FakeTime()
    other_time.ns = 5
    other_clock = GuestClock(other_time)
    other_clock.restore(saved_clock)
    other = Lapic(2, other_clock, FakeHost())
    other.restore(saved)
    assert other.save() == lapic.save()
    assert other.read(REG_TIMER_CURRENT, 4) == 750
    other_clock.set_running(True)
    other_time.ns += 750
    assert other.poll_timer(other_clock.now())
    assert other.s.isr == 1 << 0x41 and other.s.irr == (1 << 0x33) | (1 << 0x40)


def test_state_validation() -> None:
    good = LapicState().to_dict()
    assert LapicState.from_dict(good) == LapicState()
    for field, value in (("irr", "zz" * 32), ("irr", "00"), ("lvt", [0] * 3), ("tpr", 256), ("svr", -1),
                         ("timer_deadline", "soon"), ("apic_id", True), ("timer_divide", 16)):
        raw = dict(good, **{field: value})
        with pytest.raises(DeviceStateError):
            LapicState.from_dict(raw)
    with pytest.raises(DeviceStateError):
        LapicState.from_dict({**good, "extra": 1})
    with pytest.raises(DeviceStateError):
        ClockState.from_dict({"ns": -1})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x3FF), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**32 - 1)),
                max_size=40))
def test_register_fuzz_never_breaks_invariants(writes: list[tuple[int, int, int]]) -> None:
    lapic, _, t, clock = make()
    for offset, size, value in writes:
        lapic.write(offset, size, value)
        t.ns += value & 0xFFFF
        lapic.poll_timer(clock.now())
        assert 0 <= lapic.read(offset, size) < 1 << (8 * size)
        assert lapic.read(REG_TIMER_CURRENT, 4) <= lapic.s.timer_initial
        vector = lapic.deliverable()
        if vector is not None:
            lapic.acknowledge(vector)
    LapicState.from_dict(lapic.save().to_dict())
