"""`-incoming defer` + QMP `migrate-incoming` (how libvirt drives QEMU), the `events`
migration capability, and OS errors over QMP: real hv processes, real sockets, raw QMP.

The guest is checked itself: the dirty guest's serial output joined across source and
destination must equal an unmigrated run (tests.helpers.check_dirty_output).
"""
from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import FIXTURES, Vm, check_dirty_output, complete_lines

MIB = 4
LISTENING = "waiting for an incoming migration on"


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="hvi") as path:  # short: AF_UNIX paths are bounded
        yield path


@pytest.fixture
def vms(hv, sock_dir) -> Iterator[Callable[..., Vm]]:
    started: list[Vm] = []

    def make(name: str, *extra: str) -> Vm:
        vm = Vm(hv, sock_dir, name, "-machine", "q35", "-accel", "unicorn", "-m", "64",
                "-kernel", str(FIXTURES / "x86_64" / "dirty.elf"), "-append", f"mib={MIB}", *extra)
        started.append(vm)
        return vm

    yield make
    for vm in started:
        vm.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def error_desc(reply: dict) -> str:
    assert reply.get("error", {}).get("class") == "GenericError", reply
    desc = reply["error"]["desc"]
    assert "[Errno" not in desc, desc
    return desc


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_defer_destination_listens_only_after_migrate_incoming(vms, sock_dir, busy_port, transport):
    src = vms("src")
    dst = vms("dst", "-incoming", "defer")
    assert dst.execute("query-status")["return"]["status"] == "inmigrate"
    assert dst.execute("query-migrate") == {"return": {"status": "none"}}
    assert LISTENING not in dst.stderr()
    unix_path = os.path.join(sock_dir, "dst.mig")
    # Bad URIs and a busy port: clear errors, nothing starts, the next good one works.
    assert "unsupported migration URI scheme 'bogus'" in error_desc(dst.execute("migrate-incoming", uri="bogus:x"))
    assert "bad port" in error_desc(dst.execute("migrate-incoming", uri="tcp:127.0.0.1:99999"))
    assert error_desc(dst.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{busy_port}")) == \
        f"migrate-incoming: cannot listen on tcp:127.0.0.1:{busy_port}: Address already in use"
    assert "cannot read snapshot" in error_desc(dst.execute("migrate-incoming",
                                                            uri=f"file:{sock_dir}/none"))
    assert error_desc(dst.execute("migrate-incoming")) == "Parameter 'uri' is missing"
    assert LISTENING not in dst.stderr() and not os.path.exists(unix_path)
    assert dst.execute("query-status")["return"]["status"] == "inmigrate"

    uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{unix_path}"
    assert dst.execute("migrate-incoming", uri=uri) == {"return": {}}
    address = dst.incoming_address()
    if transport == "tcp":
        assert address.startswith("tcp:127.0.0.1:") and not address.endswith(":0")
    else:
        assert address == uri and os.path.exists(unix_path)
    assert error_desc(dst.execute("migrate-incoming", uri=uri)) == \
        "The incoming migration has already been started"

    src.wait_lines(3)
    assert src.execute("migrate", uri=address) == {"return": {}}
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    assert dst.execute("query-status")["return"]["status"] == "running"
    assert error_desc(dst.execute("migrate-incoming", uri=uri)) == \
        "The incoming migration has already been started"
    dst.wait_lines(len(complete_lines(dst.output())) + 2)
    dst.execute("stop")
    assert check_dirty_output("q35", MIB, src.output() + dst.output()) > 2


def test_defer_then_file_snapshot(vms, sock_dir):
    """migrate-incoming file:DIR restores a snapshot the source wrote with migrate file:DIR."""
    src = vms("src")
    src.wait_lines(3)
    snapshot = os.path.join(sock_dir, "snap")
    assert src.execute("migrate", uri=f"file:{snapshot}") == {"return": {}}
    assert src.wait_migration()["status"] == "completed"
    assert src.execute("query-status")["return"]["status"] == "paused"
    dst = vms("dst", "-incoming", "defer")
    assert dst.execute("migrate-incoming", uri=f"file:{snapshot}") == {"return": {}}
    assert dst.wait_migration()["status"] == "completed"
    assert dst.execute("query-status")["return"]["status"] == "running"
    dst.wait_lines(len(complete_lines(dst.output())) + 2)
    dst.execute("stop")
    assert check_dirty_output("q35", MIB, src.output() + dst.output()) > 2


def test_migrate_incoming_needs_defer(vms):
    plain = vms("plain", "-S")
    assert error_desc(plain.execute("migrate-incoming", uri="tcp:127.0.0.1:0")) == \
        "'-incoming' was not specified on the command line"
    given = vms("given", "-incoming", "tcp:127.0.0.1:0")
    given.incoming_address()
    assert error_desc(given.execute("migrate-incoming", uri="tcp:127.0.0.1:0")) == \
        "The incoming migration has already been started"
    assert given.stderr().count(LISTENING) == 1


def test_quit_while_deferred_ends_cleanly(vms):
    dst = vms("dst", "-incoming", "defer")
    assert dst.execute("query-status")["return"]["status"] == "inmigrate"
    assert dst.execute("quit") == {"return": {}}
    assert dst.process.wait(30) == 0
    assert "error" not in dst.stderr()


def test_events_capability_is_always_on(vms):
    vm = vms("vm", "-S")
    caps = vm.execute("query-migrate-capabilities")["return"]
    assert {"capability": "events", "state": True} in caps
    assert {"capability": "auto-converge", "state": True} in caps
    assert vm.execute("migrate-set-capabilities",
                      capabilities=[{"capability": "events", "state": True}]) == {"return": {}}
    assert "cannot be turned off" in error_desc(
        vm.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": False},
                                                              {"capability": "auto-converge", "state": False}]))
    assert vm.execute("query-migrate-capabilities")["return"] == caps  # nothing changed
    assert "supported: auto-converge, events" in error_desc(
        vm.execute("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True}]))


def test_migrate_to_a_refused_port_has_no_errno(vms):
    vm = vms("vm")
    with socket.socket() as closed:  # bound, not listening: connect is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        desc = error_desc(vm.execute("migrate", uri=f"tcp:127.0.0.1:{port}"))
    assert desc == f"cannot connect to tcp:127.0.0.1:{port}: Connection refused"
    assert vm.execute("query-status")["return"]["status"] == "running"
