"""The MC146818 RTC on a guest clock and a host UTC clock that the test moves by hand."""
from __future__ import annotations

import calendar
import json

import pytest

from hv.devices.interfaces import DeviceStateError
from hv.devices.rtc import (NS_PER_S, REG_A, REG_B, REG_C, REG_CENTURY, REG_D, REG_HOURS, REG_MDAY, REG_MINUTES,
                            REG_MONTH, REG_SECONDS, REG_WDAY, REG_YEAR, Rtc, RtcState, civil_from_days,
                            days_from_civil)
from tests.devices.conftest import RecordingLine, StepClock

MS = 1_000_000
# 2026-03-14 15:09:26.5 UTC, a Saturday
HOST_NOW = calendar.timegm((2026, 3, 14, 15, 9, 26)) * NS_PER_S + 500 * MS


def make(guest_ns: int = 7 * NS_PER_S, host_ns: int = HOST_NOW) -> tuple[Rtc, StepClock, StepClock, RecordingLine]:
    guest, host, line = StepClock(guest_ns), StepClock(host_ns), RecordingLine()
    return Rtc(guest, line, host_wall_ns=host.now), guest, host, line


def reg(rtc: Rtc, index: int) -> int:
    rtc.write(0, 1, index)
    return rtc.read(1, 1)


def put(rtc: Rtc, index: int, value: int) -> None:
    rtc.write(0, 1, index)
    rtc.write(1, 1, value)


def linux_get_time(rtc: Rtc, guest: StepClock) -> tuple[int, ...]:
    """mc146818_get_time: wait while UIP (mdelay(1)), read, re-read the seconds."""
    for _ in range(2000):
        seconds = reg(rtc, REG_SECONDS)
        if reg(rtc, REG_A) & 0x80:
            guest.ns += MS
            continue
        fields = tuple(reg(rtc, r) for r in (REG_MINUTES, REG_HOURS, REG_MDAY, REG_MONTH, REG_YEAR, REG_CENTURY))
        if reg(rtc, REG_SECONDS) == seconds:
            return (seconds, *fields)
    raise AssertionError("the UIP loop never ended")


def test_calendar_helpers_agree_with_the_standard_library() -> None:
    for days in range(-800_000, 800_000, 997):
        y, m, d = civil_from_days(days)
        assert days_from_civil(y, m, d) == days
    assert days_from_civil(2000, 2, 29) * 86400 == calendar.timegm((2000, 2, 29, 0, 0, 0))


def test_reads_host_utc_in_bcd_24h_then_binary_and_12h() -> None:
    rtc, guest, host, _ = make()
    assert linux_get_time(rtc, guest) == (0x26, 0x09, 0x15, 0x14, 0x03, 0x26, 0x20)
    assert reg(rtc, REG_WDAY) == 7 and reg(rtc, REG_D) == 0x80 and rtc.read(0, 1) == 0xFF
    host.ns += 3600 * NS_PER_S                      # the host clock no longer matters
    guest.ns += 61 * NS_PER_S
    assert (reg(rtc, REG_MINUTES), reg(rtc, REG_SECONDS)) == (0x10, 0x27)
    put(rtc, REG_B, 0x04)                           # binary, 12 hour
    assert (reg(rtc, REG_HOURS), reg(rtc, REG_MINUTES), reg(rtc, REG_YEAR)) == (0x80 | 3, 10, 26)
    put(rtc, REG_B, 0x00)                           # BCD, 12 hour
    assert reg(rtc, REG_HOURS) == 0x83


def test_uip_is_set_only_just_before_the_update() -> None:
    rtc, guest, _, _ = make()
    assert rtc.wall_ns() == HOST_NOW                # the first use takes host UTC
    guest.ns += 500 * MS - 244_000                  # wall .999756 s
    assert reg(rtc, REG_A) == 0x26 | 0x80
    guest.ns += 243_999
    assert reg(rtc, REG_A) & 0x80 and reg(rtc, REG_SECONDS) == 0x26
    guest.ns += 1
    assert reg(rtc, REG_A) == 0x26 and reg(rtc, REG_SECONDS) == 0x27
    assert linux_get_time(rtc, guest)[0] == 0x27


def test_hwclock_set_sequence_and_century_rollover() -> None:
    """mc146818_set_time: SET, divider reset, write, clear SET, release the divider."""
    rtc, guest, _, _ = make()
    put(rtc, REG_B, reg(rtc, REG_B) | 0x80)
    put(rtc, REG_A, reg(rtc, REG_A) | 0x70)
    for index, value in ((REG_YEAR, 0x99), (REG_MONTH, 0x12), (REG_MDAY, 0x31), (REG_HOURS, 0x23),
                         (REG_MINUTES, 0x59), (REG_SECONDS, 0x58), (REG_CENTURY, 0x20)):
        put(rtc, index, value)
    guest.ns += 5 * NS_PER_S                        # held: nothing moves
    assert reg(rtc, REG_SECONDS) == 0x58
    put(rtc, REG_B, reg(rtc, REG_B) & ~0x80)
    assert reg(rtc, REG_SECONDS) == 0x58            # the divider still holds it
    put(rtc, REG_A, 0x26)
    guest.ns += 499 * MS
    assert reg(rtc, REG_SECONDS) == 0x58
    guest.ns += 1 * MS                              # first update 500 ms after the release
    assert reg(rtc, REG_SECONDS) == 0x59
    guest.ns += NS_PER_S
    assert linux_get_time(rtc, guest) == (0x00, 0x00, 0x00, 0x01, 0x01, 0x00, 0x21)
    assert reg(rtc, REG_WDAY) == 6                  # 2100-01-01 is a Friday
    assert rtc.wall_ns() == calendar.timegm((2100, 1, 1, 0, 0, 0)) * NS_PER_S


def test_writing_one_register_while_running_sets_the_time_at_once() -> None:
    rtc, guest, _, _ = make()
    put(rtc, REG_HOURS, 0x02)
    assert (reg(rtc, REG_HOURS), reg(rtc, REG_MINUTES), reg(rtc, REG_SECONDS)) == (0x02, 0x09, 0x26)
    guest.ns += 500 * MS                            # the fraction of the second was kept
    assert reg(rtc, REG_SECONDS) == 0x27


def test_bad_dates_roll_over_instead_of_failing() -> None:
    rtc, _, _, _ = make()
    put(rtc, REG_B, 0x82)
    for index, value in ((REG_MONTH, 0x02), (REG_MDAY, 0x31), (REG_HOURS, 0x99), (REG_SECONDS, 0xFF)):
        put(rtc, index, value)
    put(rtc, REG_B, 0x02)
    assert (reg(rtc, REG_MONTH), reg(rtc, REG_MDAY), reg(rtc, REG_HOURS)) == (0x03, 0x03, 0x23)
    put(rtc, REG_MONTH, 0x13)
    assert reg(rtc, REG_MONTH) == 0x12


def test_periodic_interrupt_on_the_timer_deadline() -> None:
    rtc, guest, _, line = make(guest_ns=0)
    reg(rtc, REG_C)
    assert rtc.timer_deadline is None
    put(rtc, REG_A, 0x26)                           # 1024 Hz
    put(rtc, REG_B, 0x42)                           # PIE
    deadline = rtc.timer_deadline
    assert deadline == -(-32 * NS_PER_S // 32768)
    assert not rtc.poll_timer(deadline - 1) and not line.level
    guest.ns = deadline
    assert rtc.poll_timer(guest.ns) and line.level and rtc.timer_deadline is None
    assert reg(rtc, REG_C) == 0xC0 and not line.level
    assert reg(rtc, REG_C) == 0x00
    assert rtc.timer_deadline == -(-64 * NS_PER_S // 32768)
    put(rtc, REG_B, 0x02)                           # PIE off: PF still shows when read
    guest.ns += NS_PER_S
    assert rtc.timer_deadline is None and reg(rtc, REG_C) == 0x50 and not line.level   # PF, UF


def test_update_ended_interrupt_each_second() -> None:
    rtc, guest, _, line = make()
    put(rtc, REG_B, 0x12)                           # UIE
    assert reg(rtc, REG_C) == 0
    assert rtc.timer_deadline == guest.ns + 500 * MS
    guest.ns = rtc.timer_deadline
    assert rtc.poll_timer(guest.ns) and line.level
    assert reg(rtc, REG_C) == 0xD0 and not line.level          # IRQF, UF (and PF: 1024 Hz runs)
    assert rtc.timer_deadline == guest.ns + NS_PER_S
    put(rtc, REG_B, 0x92)                           # SET clears UIE
    assert reg(rtc, REG_B) == 0x82 and rtc.timer_deadline is None


def test_migration_continues_and_never_goes_back_on_a_host_that_is_behind() -> None:
    rtc, guest, _, _ = make()
    guest.ns += 90 * NS_PER_S
    before = rtc.wall_ns()
    state = RtcState.from_dict(json.loads(json.dumps(rtc.save().to_dict())))
    assert state.wall_ns == before
    # The destination's host is a day behind; its guest clock continues from the source's.
    dest, dest_guest, _, _ = make(guest_ns=0, host_ns=HOST_NOW - 86400 * NS_PER_S)
    dest_guest.ns = guest.ns
    dest.restore(state)
    assert dest.wall_ns() == before
    dest_guest.ns += 3 * NS_PER_S
    assert dest.wall_ns() == before + 3 * NS_PER_S
    assert reg(dest, REG_MDAY) == 0x14


def test_reset_keeps_the_time_and_clears_interrupts_even_as_the_clock_restarts() -> None:
    rtc, guest, host, line = make()
    put(rtc, REG_B, 0x42)
    put(rtc, 0x40, 0x5A)                            # a CMOS byte
    guest.ns += 10 * NS_PER_S
    rtc.poll_timer(guest.ns)
    assert line.level
    wall = rtc.wall_ns()
    rtc.restore(RtcState())                         # system_reset, before the clock restarts
    guest.ns = 0                                    # the guest clock restarts at 0
    host.ns += 3600 * NS_PER_S
    assert rtc.wall_ns() == wall and not line.level
    assert reg(rtc, REG_B) == 0x02 and reg(rtc, REG_C) == 0 and reg(rtc, 0x40) == 0x5A
    guest.ns = 2 * NS_PER_S
    assert rtc.wall_ns() == wall + 2 * NS_PER_S


def test_an_unused_device_takes_host_time_at_first_use() -> None:
    rtc, guest, host, _ = make()
    rtc.restore(RtcState())                         # old stream without an RTC: stays unset
    host.ns += 50 * NS_PER_S
    assert rtc.wall_ns() == HOST_NOW + 50 * NS_PER_S


@pytest.mark.parametrize("mutate", [
    lambda raw: raw.pop("cmos"),
    lambda raw: raw.update(cmos=[0] * 127),
    lambda raw: raw.update(cmos=[0] * 127 + [256]),
    lambda raw: raw.update(index=128),
    lambda raw: raw.update(wall_ns=1 << 70),
    lambda raw: raw.update(wall_ns="now"),
    lambda raw: raw.update(guest_ns=-1),
    lambda raw: raw.update(nmi_disabled=0),
])
def test_bad_state_is_refused(mutate) -> None:
    raw = RtcState(wall_ns=HOST_NOW).to_dict()
    mutate(raw)
    with pytest.raises(DeviceStateError):
        RtcState.from_dict(raw)
