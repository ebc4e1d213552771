"""The benches' host-memory bookkeeping: the lines below ``hv bench migrate``'s table read
the pre-fault line an hv destination logs (the real :func:`prefault_report` text of a real
pre-fault), and say what was backed before the runs. No timing is asserted."""
from __future__ import annotations

from pathlib import Path

from hv.bench.common import HostMemoryNotes
from hv.bench.migrate import Case, Row, Sample, Settings, raw_goal, scaling_lines
from hv.memory import GuestMemory, RegionSpec
from hv.migration.pages import prefault_memory, prefault_report


def test_pre_fault_line_of_a_real_pre_fault_is_read() -> None:
    memory = GuestMemory([RegionSpec(0, 16 << 20)])
    try:
        assert prefault_memory(memory).wait(60)
        report = prefault_report(memory)
    finally:
        memory.close()
    assert report.startswith("done: 16 MiB in ") and report.endswith(" ms"), report
    notes = HostMemoryNotes()
    notes.record_prefault("hv kvm 16M idle unix", f"hv: waiting ...\nhv: guest RAM pre-fault {report}\n")
    ms = report.split(" in ")[1].split()[0]
    assert notes.prefault == {"hv kvm 16M idle unix": [f"done {ms} ms"]}


def test_stopped_pre_fault_and_missing_line() -> None:
    notes = HostMemoryNotes()
    notes.record_prefault("a", "hv: guest RAM pre-fault stopped: 1536 of 2048 MiB in 900 ms", 0.25)
    notes.record_prefault("a", "hv: guest RAM pre-fault running: 512 of 2048 MiB for 300 ms")
    notes.record_prefault("a", "hv: something else")
    assert notes.prefault == {"a": ["stopped 900 ms (1536 of 2048 MiB) [migrate at +250 ms]",
                                    "running 300 ms (512 of 2048 MiB)", "-"]}
    assert notes.lines() == ["hv destination pre-fault, a: stopped 900 ms (1536 of 2048 MiB) [migrate at +250 ms], "
                             "running 300 ms (512 of 2048 MiB), - [migrate at +: after the destination process "
                             "started]"]


def test_warm_is_recorded_per_row() -> None:
    notes = HostMemoryNotes()
    notes.warm("hv kvm 16M idle unix", 16)
    notes.warm("qemu kvm 16M idle unix", 16)
    assert len(notes.warm_s) == 2 and all(s >= 0 for s in notes.warm_s)
    line = notes.lines()[0]
    assert line.startswith("host memory: before every migration (hv and QEMU alike) source + destination RAM "
                           "+ 128 MiB (16 MiB) was touched and freed"), line


def test_paired_raw_line() -> None:
    notes = HostMemoryNotes()
    for fraction in (0.8, 0.95, 0.5):
        notes.pair_raw("hv kvm 2G idle unix", fraction, 0.8)
    notes.pair_raw("hv kvm 2G dirty unix", 0.5)
    notes.pair_raw("hv kvm 2G idle tcp", 0.79, 0.8)
    tail = "each run's rate over the mean of the raw rates measured right before and right after it)"
    assert notes.lines() == [
        f"paired % raw, hv kvm 2G idle unix: 80% 95% 50% (median 80.0%; goal >= 80%: met; {tail}",
        f"paired % raw, hv kvm 2G dirty unix: 50% (median 50.0%; {tail}",
        f"paired % raw, hv kvm 2G idle tcp: 79% (median 79.0%; goal >= 80%: missed; {tail}"]


def test_raw_goal_only_for_a_data_heavy_idle_guest(tmp_path: Path) -> None:
    def settings(dirty_mib: int | None) -> Settings:
        return Settings(kernel=tmp_path, dirty_mib=dirty_mib, timeout=1, qemu=None)
    assert raw_goal(Case("hv", "kvm", 2048, "idle", "unix"), settings(100000)) == 0.8   # 3/4 of RAM
    assert raw_goal(Case("hv", "kvm", 2048, "idle", "unix"), settings(None)) is None    # 64 MiB of 2 GiB
    assert raw_goal(Case("hv", "kvm", 2048, "dirty", "unix"), settings(100000)) is None
    assert raw_goal(Case("qemu", "kvm", 2048, "idle", "unix"), settings(100000)) is None   # the reference


def test_scaling_line_against_the_ram_ratio() -> None:
    """2G over 512M judged against 4.5 (issue 13 item 3); a group measured at one size gets no line."""
    def row(size: int, link: str, *totals: float) -> Row:
        return Row(Case("hv", "kvm", size, "idle", link), [Sample(t, 5, 1 << 20, 1) for t in totals])
    rows = [row(512, "unix", 100, 140, 120), row(2048, "unix", 500, 540, 530), row(512, "tcp", 100),
            row(2048, "tcp", 460), row(1024, "tcp", 300),
            Row(Case("hv", "kvm", 512, "idle", "unix", tls=True), [Sample(1, 1, 1, 1)])]   # one size only
    assert scaling_lines(rows) == [
        "scaling hv kvm idle unix: total 2G / 512M = 530 / 120 ms = 4.42 (goal <= 4.50: met)",
        "scaling hv kvm idle tcp: total 2G / 512M = 460 / 100 ms = 4.60 (goal <= 4.50: missed)"]
