"""Migration URIs, real connections and listeners, and file: snapshot directories."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hv.memory import GuestMemory, RegionSpec
from hv.migration.stream import (
    PAGE_SIZE, FileChannel, Fingerprint, SocketChannel, StreamKind, StreamReader, StreamWriteError,
    StreamWriter, read_reply, send_reply,
)
from hv.migration.transport import (
    Listener, MigrationConnectError, MigrationUri, MigrationUriError, SnapshotError, SnapshotWriter, connect,
    listen, open_snapshot, parse_migration_uri,
)
from hv.state import X86CpuState


# ---------------------------------------------------------------------------------------
# URI parsing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri,expected", [
    ("tcp:192.168.0.1:4446", MigrationUri("tcp", host="192.168.0.1", port=4446)),
    ("tcp:127.0.0.1:0", MigrationUri("tcp", host="127.0.0.1", port=0)),
    ("tcp:[::1]:4446", MigrationUri("tcp", host="::1", port=4446)),
    ("tcp:[fd00::2]:65535", MigrationUri("tcp", host="fd00::2", port=65535)),
    ("tcp:localhost:1", MigrationUri("tcp", host="localhost", port=1)),
    ("tcp:dst-host.example.com:4446", MigrationUri("tcp", host="dst-host.example.com", port=4446)),
    ("unix:path/to/migrate.socket", MigrationUri("unix", path="path/to/migrate.socket")),
    ("unix:/run/hv/m.sock", MigrationUri("unix", path="/run/hv/m.sock")),
    ("file:/var/lib/snap", MigrationUri("file", path="/var/lib/snap")),
    ("file:relative dir", MigrationUri("file", path="relative dir")),
])
def test_parse_every_accepted_form(uri: str, expected: MigrationUri) -> None:
    parsed = parse_migration_uri(uri)
    assert parsed == expected
    assert str(parsed) == uri
    assert parse_migration_uri(str(parsed)) == parsed


@pytest.mark.parametrize("uri,message", [
    ("rdma:1.2.3.4:5", "unsupported migration URI scheme 'rdma' (use tcp:, unix: or file:)"),
    ("exec:cat > /tmp/x", "unsupported migration URI scheme 'exec' (use tcp:, unix: or file:)"),
    ("TCP:1.2.3.4:5", "unsupported migration URI scheme 'TCP'"),
    ("", "empty migration URI"),
    ("localhost", "has no scheme (use tcp:, unix: or file:)"),
    ("tcp:1.2.3.4:http", "bad port 'http' in migration URI"),
    ("tcp:1.2.3.4:65536", "bad port 65536 in migration URI"),
    ("tcp:1.2.3.4:", "bad port '' in migration URI"),
    ("tcp:1.2.3.4:-1", "bad port '-1'"),
    ("tcp:1.2.3.4:１２", "bad port '１２'"),
    ("tcp:1.2.3.4", "bad port '1.2.3.4'|expected tcp:HOST:PORT"),
    ("tcp:4446", "expected tcp:HOST:PORT"),
    ("tcp::4446", "empty host"),
    ("tcp:::1:4446", "IPv6 addresses must be written in brackets"),
    ("tcp:[::1:4446", "unterminated '\\[' in IPv6 address"),
    ("tcp:[::g]:4446", "bad IPv6 address '::g'"),
    ("tcp:[::1]4446", "missing ':PORT' after the IPv6 address"),
    ("tcp:[::1]:99999", "bad port 99999"),
    ("tcp:999.1.1.1:80", "bad IPv4 address '999.1.1.1'"),
    ("tcp:1.2.3:80", "bad IPv4 address '1.2.3'"),
    ("tcp:bad_host!:80", "bad host name 'bad_host!'"),
    ("unix:", "empty path"),
    ("file:", "empty path"),
    ("unix:/" + "x" * 200, "unix socket path longer than 107 bytes"),
    ("unix:/tmp/a\x00b", "NUL byte"),
])
def test_parse_errors_name_the_problem(uri: str, message: str) -> None:
    with pytest.raises(MigrationUriError, match=message.replace("(", r"\(").replace(")", r"\)")
                       if "|" not in message and "\\" not in message else message):
        parse_migration_uri(uri)


# ---------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------
def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_connect_refused_carries_the_os_reason() -> None:
    port = _free_port()
    with pytest.raises(MigrationConnectError, match=f"cannot connect to tcp:127.0.0.1:{port}: Connection refused"):
        connect(f"tcp:127.0.0.1:{port}", 2)


def test_connect_timeout_carries_the_reason() -> None:
    """A destination that never answers the SYN (its accept backlog is full)."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    held = []
    try:
        for _ in range(2):  # fill the backlog; the second attempt already times out
            s = socket.socket()
            s.settimeout(0.3)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                pass
            held.append(s)
        with pytest.raises(MigrationConnectError, match=f"cannot connect to tcp:127.0.0.1:{port}: Connection timed out"):
            connect(f"tcp:127.0.0.1:{port}", 0.3)
    finally:
        for s in held:
            s.close()
        full.close()


def test_connect_to_missing_unix_socket(tmp_path: Path) -> None:
    with pytest.raises(MigrationConnectError, match="cannot connect to unix:.*: No such file or directory"):
        connect(f"unix:{tmp_path / 'nope.sock'}", 2)


def test_connect_unresolvable_host() -> None:
    with pytest.raises(MigrationConnectError, match="cannot resolve no-such-host.invalid: "):
        connect("tcp:no-such-host.invalid:4446", 2)


def test_connect_refuses_file_uri() -> None:
    with pytest.raises(MigrationUriError, match="snapshot directory"):
        connect("file:/tmp/x", 1)
    with pytest.raises(MigrationUriError, match="snapshot directory"):
        listen("file:/tmp/x")


def _exchange(listener: Listener, uri: MigrationUri | str) -> None:
    """Source writes a stream, destination answers on the same connection."""
    src = connect(uri, 5)
    dst = listener.accept(5)
    src.settimeout(20)  # a dead peer fails the test instead of hanging it
    dst.settimeout(20)
    try:
        assert src.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) if src.family != socket.AF_UNIX else True
        fp = Fingerprint("x86_64", "q35", 1, 4 * PAGE_SIZE)

        def source() -> None:
            chan = SocketChannel(src)
            w = StreamWriter(chan)
            w.write_header("x86_64", "q35")
            w.write_config(fp)
            assert read_reply(chan).text == "config"
            w.write_ram(0, b"\x01" * PAGE_SIZE + bytes(3 * PAGE_SIZE))
            w.write_round_end(1)
            w.write_cpu(0, X86CpuState())
            w.write_end()
            result.append(read_reply(chan))

        result: list[object] = []
        thread = threading.Thread(target=source)
        thread.start()
        mem = GuestMemory([RegionSpec(0, 4 * PAGE_SIZE)])
        chan = SocketChannel(dst)
        reader = StreamReader(chan, page_count=4, ram=mem, local=fp)
        reader.read_section()
        reader.read_section()
        send_reply(chan, True, "config")
        reader.read_all()
        send_reply(chan, True, "running")
        thread.join(10)
        assert [r.ok for r in result] == [True]  # type: ignore[attr-defined]
        assert bytes(mem.page_view(0)) == b"\x01" * PAGE_SIZE
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
def test_tcp_listen_connect_two_way(host: str) -> None:
    with listen(f"tcp:{host}:0") as listener:
        port = listener.address.port
        assert port > 0
        _exchange(listener, f"tcp:{host}:{port}")


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_an_address_literal_is_connected_without_a_name_lookup(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process's first getaddrinfo costs ~1 ms, inside the migration's total-time: an IP
    literal needs none. A name still goes through it (here refused, so it fails)."""
    with listen(f"tcp:{host}:0") as listener:
        port = listener.address.port

        def no_lookup(*args: object, **kwargs: object) -> None:
            raise socket.gaierror(socket.EAI_FAIL, "lookup refused by the test")

        monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
        _exchange(listener, f"tcp:{host}:{port}")
        with pytest.raises(MigrationConnectError, match="cannot resolve localhost: lookup refused by the test"):
            connect(f"tcp:localhost:{port}", 2)


def test_tcp_sockets_are_tuned() -> None:
    with listen("tcp:127.0.0.1:0") as listener:
        src = connect(listener.address, 5)
        dst = listener.accept(5)
        for s in (src, dst):
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert s.gettimeout() is None
        src.close()
        dst.close()


def test_unix_listen_connect_two_way_and_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "migrate.socket"
    listener = listen(f"unix:{path}")
    assert path.is_socket()
    _exchange(listener, f"unix:{path}")
    listener.close()
    assert not path.exists()
    listener.close()  # idempotent


def test_accept_times_out(tmp_path: Path) -> None:
    with listen(f"unix:{tmp_path / 's'}") as listener:
        with pytest.raises(TimeoutError, match="no migration connection on unix:.* within 0.1 s"):
            listener.accept(0.1)


def test_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # the file stays, nobody listens
    assert path.is_socket()
    with listen(f"unix:{path}") as listener:
        conn = connect(f"unix:{path}", 2)
        listener.accept(2).close()
        conn.close()
    assert not path.exists()


def test_live_unix_socket_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    with listen(f"unix:{path}"):
        with pytest.raises(MigrationConnectError, match="another process is listening there"):
            listen(f"unix:{path}")
        assert path.is_socket()


def test_regular_file_in_the_way_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("keep me")
    with pytest.raises(MigrationConnectError, match="a non-socket file exists there"):
        listen(f"unix:{path}")
    assert path.read_text() == "keep me"


def test_close_does_not_remove_a_replacement_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = listen(f"unix:{path}")
    os.unlink(path)
    second = listen(f"unix:{path}")
    first.close()
    assert path.is_socket()
    second.close()
    assert not path.exists()


def test_listen_on_busy_tcp_port() -> None:
    with listen("tcp:127.0.0.1:0") as listener:
        port = listener.address.port
        with pytest.raises(MigrationConnectError, match=f"cannot listen on tcp:127.0.0.1:{port}: Address already in use"):
            listen(f"tcp:127.0.0.1:{port}")  # SO_REUSEADDR does not allow two listeners


# ---------------------------------------------------------------------------------------
# file: snapshots
# ---------------------------------------------------------------------------------------
def _write_snapshot(directory: Path, memory_pages: int, *, fail_midway: bool = False,
                    all_nonzero: bool = False) -> str:
    mem = GuestMemory([RegionSpec(0, memory_pages * PAGE_SIZE)])
    if all_nonzero:
        mem.write_pages(0, b"\x24" * (memory_pages * PAGE_SIZE))
    mem.write_pages(1, b"\x42" * PAGE_SIZE)
    fp = Fingerprint("x86_64", "q35", 1, memory_pages * PAGE_SIZE)
    with SnapshotWriter(str(directory)) as snap:
        state = StreamWriter(FileChannel(snap.state))
        sid = state.write_header("x86_64", "q35")
        state.write_config(fp)
        state.write_cpu(0, X86CpuState(rax=7))
        state.write_device("serial", "serial0", 1, {"lcr": 3})
        state.write_end()
        memory = StreamWriter(FileChannel(snap.memory))
        memory.write_header("x86_64", "q35", stream_id=sid)
        memory.write_config(fp)
        if fail_midway:
            raise RuntimeError("the machine failed mid-snapshot")
        memory.write_ram(0, mem.regions[0].view, stable=True)
        memory.write_round_end(1)
        memory.write_end()
        snap.commit()
    mem.close()
    return sid


def test_snapshot_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "nested" / "snap"  # created if missing
    sid = _write_snapshot(directory, 8)
    assert sorted(os.listdir(directory)) == ["memory", "state"]
    state_f, memory_f = open_snapshot(str(directory))
    with state_f, memory_f:
        state = StreamReader(FileChannel(state_f), page_count=8, kind=StreamKind.STATE)
        sections = state.read_all()
        mem = GuestMemory([RegionSpec(0, 8 * PAGE_SIZE)])
        memory = StreamReader(FileChannel(memory_f), page_count=8, ram=mem, kind=StreamKind.MEMORY)
        memory.read_all()
    assert state.header is not None and memory.header is not None
    assert state.header.stream_id == memory.header.stream_id == sid
    assert sections[2].state.rax == 7  # type: ignore[union-attr]
    assert bytes(mem.page_view(1)) == b"\x42" * PAGE_SIZE
    assert bytes(mem.page_view(0)) == bytes(PAGE_SIZE)


def test_state_and_memory_streams_reject_each_others_sections(tmp_path: Path) -> None:
    _write_snapshot(tmp_path / "s", 4)
    from hv.migration.stream import StreamError
    with pytest.raises(StreamError, match="CPU section in a memory-only stream"):
        data = (tmp_path / "s" / "state").read_bytes()
        StreamReader(FileChannel(io.BytesIO(data)), page_count=4, kind=StreamKind.MEMORY).read_all()
    with pytest.raises(StreamError, match="RAM section in a state-only stream"):
        data = (tmp_path / "s" / "memory").read_bytes()
        StreamReader(FileChannel(io.BytesIO(data)), page_count=4, kind=StreamKind.STATE).read_all()


def test_failed_snapshot_leaves_no_files_and_keeps_the_previous_one(tmp_path: Path) -> None:
    directory = tmp_path / "snap"
    _write_snapshot(directory, 4)
    before = {name: (directory / name).read_bytes() for name in ("state", "memory")}
    with pytest.raises(RuntimeError, match="mid-snapshot"):
        _write_snapshot(directory, 4, fail_midway=True)
    assert sorted(os.listdir(directory)) == ["memory", "state"]
    assert {name: (directory / name).read_bytes() for name in ("state", "memory")} == before


def test_open_snapshot_missing_files(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="cannot read snapshot .*/state: No such file or directory"):
        open_snapshot(str(tmp_path))
    (tmp_path / "state").write_bytes(b"")
    with pytest.raises(SnapshotError, match="cannot read snapshot .*/memory: No such file or directory"):
        open_snapshot(str(tmp_path))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount small or read-only tmpfs instances (hv's tests run as root here)."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True,
                       capture_output=True)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False, capture_output=True)


def test_snapshot_to_read_only_location(tmpfs: Callable[[str, str], Path]) -> None:
    ro = tmpfs("ro", "ro,size=1m")
    with pytest.raises(SnapshotError, match="Read-only file system"):
        _write_snapshot(ro / "snap", 4)
    with pytest.raises(SnapshotError, match="cannot write snapshot in .*: Read-only file system"):
        _write_snapshot(ro, 4)
    assert os.listdir(ro) == []


def test_snapshot_to_full_location(tmpfs: Callable[[str, str], Path]) -> None:
    full = tmpfs("full", "size=64k")
    with pytest.raises((StreamWriteError, SnapshotError), match="No space left on device"):
        _write_snapshot(full / "snap", 64, all_nonzero=True)  # 256 KiB of pages in 64 KiB
    assert os.listdir(full / "snap") == []
