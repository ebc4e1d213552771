"""No silent stall, and non-convergence said out loud (issue 14 item 3), end to end.

Real hv sources on Unicorn (any host), real unix sockets. The stalled destinations are
written here: one accepts and never reads, one reads the whole stream and then never
answers 'ready' (FakeDestination from test_migration_failures). With ``x-stall-timeout``
1 s the source must fail naming the end that stalled, and its guest must run on.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from tests.helpers import Vm, hv_command
from tests.migration.conftest import FakeDestination

PAGES = (64 << 20) // 4096


def assert_runs_on(src: Vm) -> None:
    """The source's guest was resumed (or never stopped) and keeps printing passes."""
    assert src.execute("query-status")["return"]["status"] == "running"
    src.wait_lines(src.output().count("\n") + 2)


def test_parameter_default_and_bounds(vms):
    src = vms("src")
    src.wait_lines(1)
    assert src.execute("query-migrate-parameters")["return"]["x-stall-timeout"] == 30
    error = src.execute("migrate-set-parameters", **{"x-stall-timeout": 0})["error"]
    assert error["desc"] == "Parameter 'x-stall-timeout' expects a value between 1 and 3600"
    assert src.execute("query-migrate-parameters")["return"]["x-stall-timeout"] == 30


def test_destination_that_stops_reading(vms, sock_dir):
    """A peer that accepts and never reads: the source's send blocks once the socket
    buffers are full, and fails after x-stall-timeout instead of hanging for good."""
    src = vms("src")
    src.wait_lines(2)
    path = os.path.join(sock_dir, "silent.mig")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    try:
        assert src.execute("migrate-set-parameters", **{"x-stall-timeout": 1}) == {"return": {}}
        assert src.execute("migrate", uri=f"unix:{path}") == {"return": {}}
        conn, _ = listener.accept()  # ... and never read from it
        try:
            result = src.wait_migration(timeout=60)
        finally:
            conn.close()
    finally:
        listener.close()
    assert result["status"] == "failed", result
    assert result["error-desc"] == "the destination stopped reading: nothing sent for 1 s (x-stall-timeout)"
    assert_runs_on(src)


def test_destination_that_never_answers_ready(vms, sock_dir):
    """A peer that takes the whole stream and then says nothing: the paused source gives
    up after x-stall-timeout, says which answer is missing and resumes its guest."""
    src = vms("src")
    src.wait_lines(2)
    fake = FakeDestination(sock_dir, PAGES)
    try:
        assert src.execute("migrate-set-parameters", **{"x-stall-timeout": 1}) == {"return": {}}
        assert src.execute("migrate", uri=fake.uri) == {"return": {}}
        fake.receive()  # up to END; no 'ready'
        src.qmp.wait_event("STOP")
        result = src.wait_migration(timeout=60)
        src.qmp.wait_event("RESUME")
    finally:
        fake.close()
    assert result["status"] == "failed", result
    assert result["error-desc"] == "the destination did not answer 'ready' within 1 s (x-stall-timeout)"
    assert_runs_on(src)


def not_converging_source(vms, sock_dir) -> tuple[Vm, Vm]:
    """A guest dirtying 1 MiB continuously behind a 512 KiB/s link: each dirty round
    (~2 s) leaves the whole buffer dirty again. downtime-limit 0 and no auto-converge, so
    nothing but a cancel ends it."""
    src = vms("src")
    dst = vms("dst", "-incoming", f"unix:{os.path.join(sock_dir, 'dst.mig')}")
    src.wait_lines(2)
    assert src.execute("migrate-set-parameters", **{"max-bandwidth": 512 << 10, "downtime-limit": 0}) == \
        {"return": {}}
    assert src.execute("migrate-set-capabilities", capabilities=[
        {"capability": "auto-converge", "state": False}]) == {"return": {}}
    return src, dst


def test_not_converging_is_reported(vms, sock_dir):
    """query-migrate says converging false and MIGRATION_NOT_CONVERGING is sent."""
    src, dst = not_converging_source(vms, sock_dir)
    assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
    event = src.qmp.wait_event("MIGRATION_NOT_CONVERGING", timeout=90)
    data = event["data"]
    assert data["pass"] >= 2 and data["dirty-pages"] >= 256 and data["bandwidth"] > 0, data
    assert data["cpu-throttle-percentage"] == 0
    info = src.execute("query-migrate")["return"]
    assert info["status"] == "active" and info["converging"] is False, info
    assert src.execute("migrate_cancel") == {"return": {}}
    assert src.wait_migration(timeout=60)["status"] == "canceled"
    assert "converging" not in src.execute("query-migrate")["return"]
    assert_runs_on(src)


def test_hv_migrate_warns_when_not_converging(vms, sock_dir):
    """hv migrate prints the warning line (plain output) while it is not converging."""
    src, dst = not_converging_source(vms, sock_dir)
    proc = subprocess.Popen(hv_command("migrate", "--qmp", src.qmp_path, dst.incoming_address(),
                                       "--interval", "0.2"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for _ in range(2000):  # bounded: one line per 0.2 s update at most
            line = proc.stdout.readline()
            assert line, "hv migrate ended without a warning"
            if line.startswith("warning: migration not converging"):
                break
        else:
            pytest.fail("no warning line")
        assert "the guest dirties" in line and "MB/s" in line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert_runs_on(src)
