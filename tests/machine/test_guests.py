"""Each fixture guest on each backend and architecture, started through the hv launcher."""
from __future__ import annotations

import time

import pytest

from tests.helpers import FIXTURES, GUESTS, dirty_reference

@pytest.mark.parametrize("machine,arch,accel", GUESTS)
def test_hello(hv, machine, arch, accel):
    vm = hv("-machine", machine, "-accel", accel, "-kernel", str(FIXTURES / arch / "hello.elf"),
            "-append", "console=ttyS0 some words")
    assert vm.wait(60) == 0, vm.stderr()
    assert vm.output().splitlines() == [f"hello from hv guest ({arch})", "cmdline: console=ttyS0 some words"]
    assert f"accelerator {accel}" in vm.stderr()


@pytest.mark.parametrize("machine,arch,accel", GUESTS)
def test_dirty_matches_reference(hv, machine, arch, accel):
    vm = hv("-machine", machine, "-accel", accel, "-m", "64", "-kernel", str(FIXTURES / arch / "dirty.elf"),
            "-append", "mib=2 iterations=4")
    assert vm.wait(120) == 0, vm.stderr()
    assert tuple(vm.output().splitlines()) == dirty_reference(2, 4)


@pytest.mark.parametrize("machine,arch,accel", GUESTS)
def test_dirty_too_big_reports_and_powers_off(hv, machine, arch, accel):
    vm = hv("-machine", machine, "-accel", accel, "-m", "32", "-kernel", str(FIXTURES / arch / "dirty.elf"),
            "-append", "mib=64 iterations=1")
    assert vm.wait(60) == 0
    assert "does not fit" in vm.output()


@pytest.mark.parametrize("machine,arch,accel", GUESTS)
def test_sigterm_ends_cleanly(hv, machine, arch, accel):
    vm = hv("-machine", machine, "-accel", accel, "-m", "64", "-kernel", str(FIXTURES / arch / "dirty.elf"),
            "-append", "mib=1")
    vm.wait_output("pass 2 ")
    vm.proc.terminate()
    assert vm.wait(30) == 0
    assert "Traceback" not in vm.stderr()
    assert "terminating on signal 15" in vm.stderr()


def test_default_accelerator_logs_choice(hv):
    vm = hv("-machine", "virt", "-kernel", str(FIXTURES / "aarch64" / "hello.elf"))
    assert vm.wait(60) == 0
    assert "accelerator unicorn (kvm unusable: KVM for aarch64 needs an aarch64 host)" in vm.stderr()


def test_start_paused_runs_nothing(hv):
    vm = hv("-machine", "virt", "-S", "-kernel", str(FIXTURES / "aarch64" / "hello.elf"))
    time.sleep(1.0)
    assert vm.proc.poll() is None and vm.output() == ""


def test_log_file_option(hv, tmp_path):
    log = tmp_path / "hv.log"
    vm = hv("-machine", "virt", "-kernel", str(FIXTURES / "aarch64" / "hello.elf"), "-D", str(log))
    assert vm.wait(60) == 0
    assert "accelerator unicorn" in log.read_text()
    assert vm.stderr() == ""  # everything went to the log file
