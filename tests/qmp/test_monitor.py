"""The machine's QMP commands and events, end to end: a real hv process, real sockets,
the real qemu.qmp client and raw ncat-style JSON lines."""
from __future__ import annotations

import asyncio
import os
import tempfile
import time

import pytest
from qemu.qmp import EventListener, QMPClient

from tests.helpers import FIXTURES, GUESTS, RawQmp, complete_lines


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="hvq") as path:  # short: AF_UNIX paths are bounded
        yield path


def start_vm(hv, sock_dir, machine="virt", arch="aarch64", accel="unicorn", append="mib=1", *extra):
    path = os.path.join(sock_dir, "m.sock")
    vm = hv("-machine", machine, "-accel", accel, "-m", "64", "-kernel", str(FIXTURES / arch / "dirty.elf"),
            "-append", append, "-qmp", f"unix:{path},server,nowait", *extra)
    return vm, path


def test_lifecycle_over_raw_socket(hv, sock_dir):
    vm, path = start_vm(hv, sock_dir, "virt", "aarch64", "unicorn", "mib=1", "-S", "-name", "guest1")
    qmp = RawQmp(path)
    try:
        assert qmp.greeting["QMP"]["version"]["package"].startswith("hv-")
        assert qmp.execute("query-status")["return"] == {"running": False, "singlestep": False,
                                                          "status": "prelaunch"}
        assert qmp.execute("query-name") == {"return": {"name": "guest1"}}
        cpus = qmp.execute("query-cpus-fast")["return"]
        assert [c["cpu-index"] for c in cpus] == [0] and cpus[0]["target"] == "aarch64"
        assert vm.output() == ""
        assert qmp.execute("cont") == {"return": {}}
        event = qmp.wait_event("RESUME")
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        vm.wait_output("pass 2 ")
        assert qmp.execute("cont") == {"return": {}}  # already running: no second RESUME
        assert qmp.execute("stop") == {"return": {}}
        qmp.wait_event("STOP")
        assert qmp.execute("stop") == {"return": {}}
        assert qmp.execute("query-status")["return"]["status"] == "paused"
        assert not any(e["event"] in ("STOP", "RESUME") for e in qmp.events)
        assert qmp.execute("quit") == {"return": {}}
        event = qmp.wait_event("SHUTDOWN")
        assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
    finally:
        qmp.close()
    assert vm.wait(30) == 0
    assert not os.path.exists(path)


def test_guest_power_off_emits_shutdown_and_removes_socket(hv, sock_dir):
    vm, path = start_vm(hv, sock_dir, "virt", "aarch64", "unicorn", "mib=1 iterations=3", "-S")
    qmp = RawQmp(path)
    try:
        qmp.execute("cont")
        event = qmp.wait_event("SHUTDOWN")
        assert event["data"] == {"guest": True, "reason": "guest-shutdown"}
    finally:
        qmp.close()
    assert vm.wait(30) == 0
    assert not os.path.exists(path)
    assert vm.output().splitlines()[-1] == "done"


@pytest.mark.parametrize("machine,arch,accel", GUESTS)
def test_stop_freezes_guest_and_cont_continues(hv, sock_dir, machine, arch, accel):
    vm, path = start_vm(hv, sock_dir, machine, arch, accel, "mib=1")
    qmp = RawQmp(path)
    try:
        vm.wait_output("pass 3 ")
        qmp.execute("stop")
        frozen = vm.output()
        time.sleep(0.5)
        assert vm.output() == frozen
        qmp.execute("cont")
        last = complete_lines(frozen)[-1]  # stop may land in the middle of a line
        passes = int(last.split()[1])
        text = vm.wait_output(f"pass {passes + 2} ")
        assert text.startswith(frozen)  # continued where it was: nothing lost or repeated
        assert "bad 0" in text.splitlines()[-2] if len(text.splitlines()) > 1 else True
        assert all(" bad 0" in line for line in text.splitlines()[1:-1])
        qmp.execute("quit")
    finally:
        qmp.close()
    assert vm.wait(30) == 0


def test_system_reset_restarts_guest(hv, sock_dir):
    vm, path = start_vm(hv, sock_dir, "virt", "aarch64", "unicorn", "mib=1")
    qmp = RawQmp(path)
    try:
        vm.wait_output("pass 2 ")
        assert qmp.execute("system_reset") == {"return": {}}
        qmp.wait_event("RESET")
        deadline = time.monotonic() + 30
        while vm.output().count("dirty: mib=1") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        qmp.execute("quit")
    finally:
        qmp.close()
    assert vm.wait(30) == 0


def test_errors_keep_connection_usable(hv, sock_dir):
    vm, path = start_vm(hv, sock_dir, "virt", "aarch64", "unicorn", "mib=1", "-S")
    qmp = RawQmp(path)
    try:
        reply = qmp.execute("no-such-command")
        assert reply["error"]["class"] == "CommandNotFound"
        reply = qmp.execute("stop", bogus=1)
        assert reply["error"]["class"] == "GenericError" and "bogus" in reply["error"]["desc"]
        qmp.sock.sendall(b'{"execute": \r\n')  # unfinished: waits for more
        qmp.sock.sendall(b'"query-status", "id": [1, "x"]}\r\n')
        reply = qmp._read()
        assert reply["id"] == [1, "x"] and reply["return"]["status"] == "prelaunch"
        qmp.sock.sendall(b"\xff\xfe not json\r\n")
        assert qmp._read()["error"]["class"] == "GenericError"
        assert qmp.execute("query-status")["return"]["status"] == "prelaunch"
        qmp.execute("quit")
    finally:
        qmp.close()
    assert vm.wait(30) == 0


def test_real_qemu_qmp_client(hv, sock_dir):
    vm, path = start_vm(hv, sock_dir, "virt", "aarch64", "unicorn", "mib=1", "-S")

    async def drive() -> list[str]:
        client = QMPClient("test")
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.connect(path)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        seen: list[str] = []
        listener = EventListener()
        with client.listen(listener):
            assert (await client.execute("query-status"))["status"] == "prelaunch"
            await client.execute("cont")
            assert (await client.execute("query-status"))["running"] is True
            await client.execute("stop")
            async for event in listener:
                seen.append(event["event"])
                if event["event"] == "STOP":
                    break
            await client.execute("quit")
        try:
            await client.disconnect()
        except EOFError:
            pass  # the monitor closes after quit, as QEMU's does
        return seen

    assert asyncio.run(asyncio.wait_for(drive(), 60)) == ["RESUME", "STOP"]
    assert vm.wait(30) == 0
