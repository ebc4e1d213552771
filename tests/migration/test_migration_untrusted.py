"""What a hostile migration peer or snapshot directory must not be able to do (issue 9).

* forge lines or send terminal escapes through the text hv prints (ERROR reasons, device
  ids in the CONFIG fingerprint): everything from a peer is shown escaped, and ids that
  are not -device-style identifiers are refused before comparison;
* hang ``hv -incoming``: a FIFO as a snapshot file is refused at once, and a source that
  stalls mid-stream never keeps quit or SIGTERM from ending hv;
* read the guest's memory from a snapshot: ``state``/``memory`` are created 0600.

Real hv processes, real sockets and files; the hostile peers are written here with the
stream's own writer (tests.migration.conftest's FakeSource / FakeDestination).
"""
from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time

import pytest

from hv.migration.stream import (
    DeviceFingerprint,
    Fingerprint,
    SectionType,
    StreamError,
    compare_fingerprints,
    send_reply,
)
from hv.migration.transport import SnapshotError, SnapshotWriter, open_snapshot
from tests.helpers import complete_lines
from tests.migration.conftest import (ERROR_PREFIX, STALLS, FakeDestination, assert_destination_gave_up, incoming,
                                      stall_source)

FORGED = "x\nhv: forged line\x1b[2J"


def assert_no_forgery(stderr: str) -> None:
    """No raw control character reached the terminal and no line was forged."""
    assert "\x1b" not in stderr and "\r" not in stderr, stderr
    assert not any(line.startswith("hv: forged") for line in stderr.splitlines()), stderr


# -- forged text ---------------------------------------------------------------------------------
def test_forged_error_section_is_shown_escaped(vms, sock_dir, fake_source):
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="unicorn", memory="64", mib=4)
    fake = fake_source(dst)
    fake.prefix()
    fake.writer.write_error(FORGED)
    fake.finish_sending()
    last = assert_destination_gave_up(dst)
    assert_no_forgery(dst.stderr())
    assert last == ERROR_PREFIX + "the other end reported an error: x\\nhv: forged line\\x1b[2J", last


def test_forged_device_id_in_config_is_refused_before_comparison(vms, sock_dir, fake_source):
    """The adversary's case: a device the destination lacks, with an id that would print
    as a second 'hv: ...' line plus a clear-screen sequence."""
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="unicorn", memory="64", mib=4)
    fake = fake_source(dst)
    config = fake.machine.fingerprint()
    config["devices"].append({"type": "virtio-blk-pci", "id": FORGED, "bus": "pcie.0", "addr": "0x5",
                              "attrs": {}})
    fake.writer.write_header("x86_64", "q35")
    fake.writer.write_section(SectionType.CONFIG, json.dumps(config).encode())
    reply = fake.reply()
    assert not reply.ok and "is not a valid device id" in reply.text, reply
    assert "present on the source" not in reply.text  # refused before any comparison
    last = assert_destination_gave_up(dst, "is not a valid device id")
    assert_no_forgery(dst.stderr())
    assert "x\\nhv: forged line\\x1b[2J" in last


@pytest.mark.parametrize("field", ["id", "type"])
def test_fingerprint_ids_follow_the_device_id_rule(field):
    good = {"type": "virtio-blk-pci", "id": "disk0", "bus": "pcie.0", "addr": "0x1", "attrs": {}}
    raw = {"arch": "x86_64", "machine": "q35", "vcpus": 1, "memory": 1 << 20, "devices": [good]}
    assert Fingerprint.from_dict(raw).devices[0].id == "disk0"
    for bad in (FORGED, "", "1disk", "a" * 65, "disk\u2028", 7):
        raw["devices"] = [{**good, field: bad}]
        with pytest.raises(StreamError, match="is not a valid device id") as info:
            Fingerprint.from_dict(raw)
        assert str(info.value).isprintable()


def test_mismatch_lines_escape_every_field():
    """Fields that are not ids (bus, addr, attribute names) may hold anything: escaped."""
    src = Fingerprint("x86_64", "q35", 1, 1 << 20, (DeviceFingerprint("virtio-net-pci", "n0", "pcie.0\n",
                                                                      "0x1\x1b", {"mac\x9b": "1"}),))
    dst = Fingerprint("x86_64", "q35", 1, 1 << 20, (DeviceFingerprint("virtio-net-pci", "n0", "pcie.0", "0x1"),))
    lines = compare_fingerprints(src, dst)
    assert lines == ["device n0 (virtio-net-pci) bus/addr mismatch: source pcie.0\\n/0x1\\x1b, "
                     "destination pcie.0/0x1",
                     "device n0 (virtio-net-pci) mac\\x9b mismatch: source '1', destination (unset)"]


def test_destination_refusal_is_logged_escaped_by_the_source(vms, sock_dir):
    """The other direction: a hostile destination's ERROR reaches the source's log escaped
    (and its error-desc, a JSON string, holds the escaped text too)."""
    src = vms("src", accel="unicorn", memory="64", mib=4)
    src.wait_lines(2)
    fake = FakeDestination(sock_dir, (64 << 20) // 4096)
    try:
        assert src.execute("migrate", uri=fake.uri) == {"return": {}}
        channel = fake.receive()
        send_reply(channel, False, FORGED)
        result = src.wait_migration(timeout=60)
    finally:
        fake.close()
    assert result["status"] == "failed"
    assert result["error-desc"] == "destination refused: x\\nhv: forged line\\x1b[2J", result
    assert_no_forgery(src.stderr())
    assert "destination refused: x\\nhv: forged line\\x1b[2J" in src.stderr()


# -- nothing hangs hv ------------------------------------------------------------------------------
def _snapshot(vms, tmp_path) -> str:
    src = vms("src", accel="unicorn", memory="64", mib=4)
    src.wait_lines(2)
    snap = str(tmp_path / "snap")
    assert src.execute("migrate", uri=f"file:{snap}") == {"return": {}}
    assert src.wait_migration()["status"] == "completed"
    return snap


@pytest.mark.parametrize("name", ["state", "memory"])
@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_snapshot_file_that_is_not_regular_is_refused(vms, tmp_path, name, kind):
    snap = _snapshot(vms, tmp_path)
    path = os.path.join(snap, name)
    os.rename(path, path + ".real")
    if kind == "fifo":
        os.mkfifo(path)  # opened without O_NONBLOCK, this blocks hv for good
    else:
        os.symlink(path + ".real", path)
    dst = vms("dst", "-incoming", f"file:{snap}", accel="unicorn", memory="64", mib=4)
    assert dst.process.wait(60) == 1
    lines = dst.stderr().strip().splitlines()
    what = "a FIFO" if kind == "fifo" else "a symbolic link"
    assert lines[-1] == f"{ERROR_PREFIX}cannot read snapshot {path}: {what}, not a regular file", lines
    assert not any(line.startswith("Traceback") for line in lines)
    assert dst.output() == ""


def test_open_snapshot_refuses_a_fifo_without_blocking(tmp_path):
    """In process: the open itself must not wait for a writer (the hang was in open()).
    Run in a thread so that a blocking open fails this test instead of hanging it."""
    (tmp_path / "memory").write_bytes(b"")
    fifo = tmp_path / "state"
    os.mkfifo(fifo)
    outcome: list[BaseException | object] = []

    def attempt() -> None:
        try:
            outcome.append(open_snapshot(str(tmp_path)))
        except BaseException as exc:  # noqa: BLE001 - examined below
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # blocked in open(): release it (a writer appears), then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail("open_snapshot blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], SnapshotError), outcome
    assert "a FIFO, not a regular file" in str(outcome[0])


@pytest.mark.parametrize("where", STALLS)
@pytest.mark.parametrize("how", ["sigterm", "quit"])
def test_stalled_source_never_keeps_hv_alive(vms, sock_dir, fake_source, where, how):
    """A source that connects and then stops sending (keeping the connection open): quit
    and SIGTERM still end hv, which never runs the guest."""
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="unicorn", memory="64", mib=4)
    fake = fake_source(dst)
    stall_source(fake, where)
    deadline = time.monotonic() + 30  # the destination has read what there is
    while dst.execute("query-migrate")["return"]["status"] == "setup" and where != "connected":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert dst.execute("query-status")["return"]["status"] == "inmigrate"
    if how == "quit":
        assert dst.execute("quit") == {"return": {}}
    else:
        dst.process.proc.send_signal(signal.SIGTERM)
    assert dst.process.wait(60) == 0
    assert dst.output() == "" and "Traceback" not in dst.stderr()
    assert not os.path.exists(dst.qmp_path)


# -- snapshot file modes ---------------------------------------------------------------------------
def test_snapshot_files_are_private(vms, tmp_path):
    snap = _snapshot(vms, tmp_path)
    for name in ("state", "memory"):
        assert stat.S_IMODE(os.stat(os.path.join(snap, name)).st_mode) == 0o600, name


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_snapshot_writer_mode_ignores_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with SnapshotWriter(str(tmp_path)) as snapshot:
            snapshot.state.write(b"s")
            snapshot.memory.write(b"m")
            snapshot.commit()
    finally:
        os.umask(old)
    for name in ("state", "memory"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name


# -- destination times ----------------------------------------------------------------------------
def test_destination_times_start_at_the_connection(vms, sock_dir):
    """The destination waited for the source before the migration began: that wait is in
    neither its setup-time nor its total-time. Both lie inside the interval the test saw
    from 'migrate' to 'completed' (a causal bound, not a speed figure)."""
    src = vms("src", accel="unicorn", memory="64", mib=4)
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="unicorn", memory="64", mib=4)
    src.wait_lines(2)
    uri = dst.incoming_address()
    time.sleep(1.5)  # the destination waits, listening
    started = time.monotonic()
    assert src.execute("migrate", uri=uri) == {"return": {}}
    assert src.wait_migration()["status"] == "completed"
    seen_ms = (time.monotonic() - started) * 1000
    result = dst.wait_migration()
    assert result["status"] == "completed", result
    assert 0 <= result["setup-time"] <= result["total-time"] <= seen_ms + 1, (result, seen_ms)
    assert 0 <= result["downtime"] <= result["total-time"] - result["setup-time"] + 2, result
    assert dst.execute("query-status")["return"]["status"] == "running"
    dst.wait_lines(len(complete_lines(dst.output())) + 1)
