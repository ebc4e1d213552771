"""The QMP server over real sockets: ncat-style raw clients, qemu.qmp, errors, events, files."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import EventListener, ExecuteError, QMPClient

from hv.qmp import (
    MAX_MESSAGE_BYTES,
    CommandTable,
    QmpServer,
    QmpServerError,
    Reply,
    SocketSpec,
    parse_qmp_option,
    version_info,
)
from hv.qmp.protocol import greeting
from tests.helpers import require_tool

from tests.qmp.conftest import TIMEOUT, Harness, RawClient, build_table, connect, expect_works, start_harness, wait_for


# ------------------------------------------------------------- ncat transcript
@pytest.mark.parametrize("via", ["unix", "tcp"])
def test_ncat_transcript_without_negotiation(harness: Harness, via: str) -> None:
    client = RawClient(harness.unix_path if via == "unix" else harness.tcp)
    client.sock.settimeout(TIMEOUT)
    raw = b""
    while not raw.endswith(b"\r\n"):
        raw += client.sock.recv(4096)
    assert json.loads(raw) == {"QMP": {"version": version_info(), "capabilities": []}}
    assert version_info()["package"].startswith("hv-")
    client.send(b'{"execute":"migrate", "arguments":{"uri":"tcp:192.168.0.1:4446"}}\r\n')
    assert client.recv() == {"return": {}}
    assert client.command("qmp_capabilities") == {"return": {}}
    assert client.command("qmp_capabilities") == {"return": {}}  # again: still fine
    expect_works(client)
    client.close()


@require_tool("ncat")
def test_real_ncat_session(harness: Harness) -> None:
    """The seed's transcript through the real ``ncat -U``, which half-closes at stdin EOF."""
    script = (b'{"execute":"migrate", "arguments":{"uri":"tcp:192.168.0.1:4446"}}\n'
              b'{"execute":"no-such"}\n'
              b'{"execute":"query-version","id":7}\n')
    done = subprocess.run(["ncat", "-U", harness.unix_path], input=script, capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split(b"\r\n")
    assert lines[-1] == b""
    assert [json.loads(line) for line in lines[:-1]] == [
        greeting(),
        {"return": {}},
        {"error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"}},
        {"return": version_info(), "id": 7},
    ]
    wait_for(lambda: harness.server.client_count() == 0)


def test_half_closed_client_still_gets_every_reply(harness: Harness) -> None:
    client = connect(harness)
    client.send((b'{"execute": "echo", "arguments": {"value": "' + b"v" * 60000 + b'"}}\n') * 20)
    client.sock.shutdown(socket.SHUT_WR)
    for _ in range(20):
        assert client.recv() == {"return": "v" * 60000}
    assert client.at_eof()
    wait_for(lambda: harness.server.client_count() == 0)


@pytest.mark.parametrize("request_id", [1, "abc", None, [1, {"a": 2}], {"x": "y"}, 1.5, True, -7])
def test_id_of_any_type_is_echoed(harness: Harness, request_id: Any) -> None:
    client = connect(harness)
    assert client.command("echo", {"value": 5}, id=request_id) == {"return": 5, "id": request_id}
    reply = client.command("nope", id=request_id)
    assert reply["id"] == request_id and reply["error"]["class"] == "CommandNotFound"
    reply = client.command("typed", {}, id=request_id)
    assert reply == {"error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"}, "id": request_id}
    reply = client.command("fail", id=request_id)
    assert reply["id"] == request_id and reply["error"]["class"] == "DeviceNotFound"
    client.send(json.dumps({"execute": 3, "id": request_id}).encode() + b"\n")
    assert client.recv()["id"] == request_id
    client.close()


# ------------------------------------------------------------------ error paths
ERROR_CASES = [
    (b'{"execute": "no-such-command"}', "CommandNotFound", "The command no-such-command has not been found"),
    (b'{"execute": }', "GenericError", "JSON parse error, Expecting value"),
    (b'{"execute" "x"}', "GenericError", "JSON parse error, Expecting ':' delimiter"),
    (b"[1, 2]", "GenericError", "QMP input must be a JSON object"),
    (b"42", "GenericError", "QMP input must be a JSON object"),
    (b"hello there", "GenericError", "JSON parse error, Expecting value"),
    (b"}", "GenericError", "JSON parse error, Expecting value"),
    (b'{"arguments": {}}', "GenericError", "QMP input lacks member 'execute'"),
    (b'{"execute": ["x"]}', "GenericError", "QMP input member 'execute' must be a string"),
    (b'{"execute": "echo", "arguments": [1]}', "GenericError", "QMP input member 'arguments' must be an object"),
    (b'{"execute": "echo", "exec-oob": "x"}', "GenericError", "QMP input member 'exec-oob' is unexpected"),
    (b'{"execute": "echo", "execute": "echo"}', "GenericError", "JSON parse error, duplicate key 'execute'"),
    (b'{"execute": "ech\xff\xfeo"}', "GenericError", "JSON parse error, invalid UTF-8 sequence at byte 16"),
    (b'{"execute": "ech\x01o"}', "GenericError", "JSON parse error, control character in a string"),
    (b'{"execute": "echo", "arguments": {"value": Infinity}}', "GenericError", "JSON parse error, Infinity is not valid JSON"),
    (b'{"execute": "migrate"}', "GenericError", "Parameter 'uri' is missing"),
    (b'{"execute": "migrate", "arguments": {"uri": 4446}}', "GenericError", "Parameter 'uri' expects string"),
    (b'{"execute": "migrate", "arguments": {"uri": "x", "foo": 1}}', "GenericError", "Invalid parameter 'foo'"),
    (b'{"execute": "typed", "arguments": {"uri": "x", "count": "3"}}', "GenericError", "Parameter 'count' expects integer"),
    (b'{"execute": "query-version", "arguments": {"x": 1}}', "GenericError", "Invalid parameter 'x'"),
    (b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}', "GenericError", "Capability 'oob' is not available"),
    (b'{"execute": "fail"}', "DeviceNotFound", "Device 'nic9' not found"),
    (b'{"execute": "boom"}', "GenericError", "internal error in boom: kaput"),
    (b'{"execute": "unencodable"}', "GenericError",
     "internal error: reply cannot be encoded: Object of type object is not JSON serializable"),
    (b"[" * 100 + b"]" * 100, "GenericError", "JSON parse error, nesting deeper than 64"),
    (b'{"execute": "echo", "arguments": {"value": "' + b"x" * MAX_MESSAGE_BYTES + b'"}}', "GenericError",
     f"QMP message exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
]


@pytest.mark.parametrize(("data", "error_class", "desc"), ERROR_CASES,
                         ids=[f"case{i}" for i in range(len(ERROR_CASES))])
def test_error_reply_then_next_command_works(harness: Harness, data: bytes, error_class: str, desc: str) -> None:
    client = connect(harness)
    client.send(data + b"\r\n")
    assert client.recv() == {"error": {"class": error_class, "desc": desc}}
    expect_works(client)
    assert client.command("echo", {"value": "same connection"}) == {"return": "same connection"}
    client.close()


def test_oversized_message_discards_to_newline(harness: Harness) -> None:
    client = connect(harness)
    # One oversized message, then more bytes on the same line: all discarded, one error.
    client.send(b'{"execute": "echo", "arguments": {"value": "' + b"y" * (MAX_MESSAGE_BYTES + 10) + b'"}}'
                + b'{"execute": "echo", "arguments": {"value": "lost"}}\n')
    assert client.recv()["error"]["desc"].startswith("QMP message exceeds the limit")
    assert client.command("echo", {"value": "kept"}) == {"return": "kept"}
    # A message of just under the limit is fine.
    padding = MAX_MESSAGE_BYTES - len(b'{"execute": "echo", "arguments": {"value": ""}}')
    value = "z" * padding
    assert client.command("echo", {"value": value}) == {"return": value}
    client.close()


def test_split_reads_and_concatenated_messages(harness: Harness) -> None:
    client = connect(harness)
    stream = (b'{"execute": "echo", "arguments": {"value": "a}{\\""}, "id": 1}'
              b'{"execute": "echo", "arguments": {"value": [1, {"b": 2}]}, "id": 2}\n'
              b'  {"execute": "query-version", "id": 3}\r\n')
    for i in range(len(stream)):
        client.send(stream[i : i + 1])
        if i % 17 == 0:
            time.sleep(0.001)
    assert client.recv() == {"return": 'a}{"', "id": 1}
    assert client.recv() == {"return": [1, {"b": 2}], "id": 2}
    assert client.recv() == {"return": version_info(), "id": 3}
    client.send(b'{"execute": "echo", "arguments": {"value": 1}}' * 20)
    for _ in range(20):
        assert client.recv() == {"return": 1}
    client.close()


def test_disconnect_mid_message_harms_nothing(harness: Harness) -> None:
    other = connect(harness)
    for _ in range(5):
        victim = connect(harness)
        victim.send(b'{"execute": "echo", "argum')
        victim.close()
    victim = connect(harness)
    victim.send(b'{"execute": "slow"}{"execute": "slow"}')  # replies it will never read
    victim.sock.shutdown(socket.SHUT_RDWR)
    victim.close()
    wait_for(lambda: harness.server.client_count() == 1)
    expect_works(other)
    expect_works(connect(harness))


# --------------------------------------------------------- clients and events
def test_many_clients_each_greeted_and_all_get_events(harness: Harness) -> None:
    clients = [connect(harness, via) for via in ("unix", "tcp") * 3]
    wait_for(lambda: harness.server.client_count() == 6)
    harness.server.emit_event("STOP")
    harness.server.emit_event("MIGRATION", {"status": "active"})
    for client in clients:
        stop = client.recv()
        assert stop["event"] == "STOP" and "data" not in stop
        assert set(stop["timestamp"]) == {"seconds", "microseconds"}
        assert abs(stop["timestamp"]["seconds"] - time.time()) < 60
        assert 0 <= stop["timestamp"]["microseconds"] < 1_000_000
        migration = client.recv()
        assert migration["event"] == "MIGRATION" and migration["data"] == {"status": "active"}
    # An event emitted by a handler reaches everyone, the caller before its reply.
    reply = clients[0].command("emit", {"n": 7})
    assert reply["event"] == "TEST_EVENT" and reply["data"] == {"n": 7}
    assert clients[0].recv() == {"return": {"emitted": True}}
    for client in clients[1:]:
        assert client.recv()["data"] == {"n": 7}
        expect_works(client)
    for client in clients:
        client.close()


def test_events_from_many_threads_while_commands_run(harness: Harness) -> None:
    clients = [connect(harness) for _ in range(3)]
    per_thread = 50

    def emitter(tag: int) -> None:
        for n in range(per_thread):
            harness.server.emit_event("TICK", {"thread": tag, "n": n})

    threads = [threading.Thread(target=emitter, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for client in clients:
        client.send(b'{"execute": "echo", "arguments": {"value": 1}, "id": "c"}\n' * 10)
    for thread in threads:
        thread.join()
    for client in clients:
        seen: dict[int, list[int]] = {t: [] for t in range(4)}
        replies = 0
        while replies < 10 or sum(map(len, seen.values())) < 4 * per_thread:
            message = client.recv()
            if "event" in message:
                seen[message["data"]["thread"]].append(message["data"]["n"])
            else:
                assert message == {"return": 1, "id": "c"}
                replies += 1
        assert all(ns == list(range(per_thread)) for ns in seen.values())  # each thread's order kept
        client.close()


def test_commands_are_serialised(harness: Harness) -> None:
    clients = [connect(harness, via) for via in ("unix", "tcp", "unix")]
    for client in clients:
        client.send(b'{"execute": "slow"}\n' * 5)
    for client in clients:
        for _ in range(5):
            assert client.recv() == {"return": {}}
    assert harness.active[1] == 1


def test_client_limit_refuses_with_a_message(sockdir: Path) -> None:
    h = start_harness(sockdir, max_clients=2)
    try:
        first, second = connect(h), connect(h)
        third = RawClient(h.unix_path)
        assert third.recv() == {"error": {"class": "GenericError", "desc": "too many QMP clients (limit 2)"}}
        assert third.at_eof()
        expect_works(first)
        second.close()
        wait_for(lambda: h.server.client_count() == 1)
        expect_works(connect(h))
    finally:
        h.server.close()


def test_client_that_stops_reading_is_dropped(sockdir: Path) -> None:
    h = start_harness(sockdir, max_output=256 * 1024)
    try:
        reader = connect(h)
        sleeper = connect(h)
        wait_for(lambda: h.server.client_count() == 2)
        blob = "e" * 10000
        for n in range(400):  # ~4 MB: beyond the kernel's socket buffers plus the limit
            h.server.emit_event("BIG", {"n": n, "blob": blob})
            if n % 5 == 4:  # the reader keeps up
                for k in range(n - 4, n + 1):
                    assert reader.recv()["data"]["n"] == k
        wait_for(lambda: h.server.client_count() == 1)
        expect_works(reader)
        sleeper.close()
    finally:
        h.server.close()


def test_reply_after_runs_once_reply_sent_and_close_from_callback(harness: Harness) -> None:
    watcher = connect(harness)
    client = connect(harness)
    assert client.command("quit", id="q") == {"return": {}, "id": "q"}
    event = client.recv()
    assert event["event"] == "SHUTDOWN" and event["data"]["reason"] == "host-qmp-quit"
    assert client.at_eof()
    assert watcher.recv()["event"] == "SHUTDOWN"
    assert watcher.at_eof()
    assert harness.after_calls == ["quit"]
    assert not os.path.exists(harness.unix_path)
    harness.server.close()  # idempotent
    harness.server.emit_event("LATE")  # a no-op after close


# ------------------------------------------------------------ socket files
def test_unix_socket_mode_and_removal(harness: Harness) -> None:
    st_ = os.lstat(harness.unix_path)
    assert stat.S_ISSOCK(st_.st_mode)
    assert stat.S_IMODE(st_.st_mode) == 0o600
    client = connect(harness)
    harness.server.close()
    assert not os.path.exists(harness.unix_path)
    assert client.at_eof()
    harness.server.close()


def test_stale_socket_replaced(sockdir: Path) -> None:
    path = sockdir / "qmp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: stale
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    h = start_harness(sockdir, tcp_host=None)
    try:
        expect_works(connect(h))
    finally:
        h.server.close()
    assert not path.exists()


def test_live_socket_and_regular_file_refused(sockdir: Path) -> None:
    h = start_harness(sockdir, tcp_host=None)
    try:
        with pytest.raises(QmpServerError, match="in use by another running server"):
            QmpServer([SocketSpec("unix", path=h.unix_path)], CommandTable()).start()
        expect_works(connect(h))  # the running server was not disturbed
    finally:
        h.server.close()
    regular = sockdir / "qmp.sock"
    regular.write_text("precious")
    with pytest.raises(QmpServerError, match="exists and is not a socket; refusing to replace it"):
        QmpServer([SocketSpec("unix", path=str(regular))], CommandTable()).start()
    assert regular.read_text() == "precious"


def test_close_leaves_a_file_that_replaced_the_socket(sockdir: Path) -> None:
    h = start_harness(sockdir, tcp_host=None)
    os.unlink(h.unix_path)
    Path(h.unix_path).write_text("someone else's")
    h.server.close()
    assert Path(h.unix_path).read_text() == "someone else's"


def test_failed_start_releases_what_it_bound(sockdir: Path) -> None:
    blocker = socket.socket(socket.AF_INET)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    path = str(sockdir / "a.sock")
    server = QmpServer([SocketSpec("unix", path=path), SocketSpec("tcp", host="127.0.0.1", port=port)],
                       CommandTable())
    with pytest.raises(QmpServerError, match=f"cannot listen on tcp:127.0.0.1:{port}"):
        server.start()
    assert not os.path.exists(path)
    blocker.close()


@pytest.mark.parametrize("option", ["tcp:127.0.0.1:0", "tcp:[::1]:0", "tcp:localhost:0"])
def test_tcp_addresses(sockdir: Path, option: str) -> None:
    if "::1" in option and not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python build")
    server = QmpServer([parse_qmp_option(option + ",server,nowait")], CommandTable())
    server.start()
    try:
        for spec in server.addresses:
            assert spec.port != 0
            client = RawClient((spec.host, spec.port))
            assert client.recv() == greeting()
            expect_works(client)
            client.close()
    finally:
        server.close()


# ------------------------------------------------------------------- qemu.qmp
def test_qemu_qmp_client_unix_and_tcp(harness: Harness) -> None:
    async def scenario() -> None:
        for address in (harness.unix_path, harness.tcp):
            qmp = QMPClient("hv-test")
            await qmp.connect(address)
            assert qmp.greeting is not None
            assert await qmp.execute("query-version") == version_info()
            names = {entry["name"] for entry in await qmp.execute("query-commands")}
            assert {"qmp_capabilities", "query-version", "query-commands", "migrate"} <= names
            assert await qmp.execute("typed", {"uri": "u", "count": 2}) == {"uri": "u", "count": 2}
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("nope")
            assert info.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("migrate", {"uri": 1})
            assert info.value.error_class == "GenericError"
            assert str(info.value) == "Parameter 'uri' expects string"
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("fail")
            assert info.value.error_class == "DeviceNotFound"
            assert await qmp.execute("echo", {"value": "still fine"}) == "still fine"

            listener = EventListener(("STOP", "RESUME"))
            with qmp.listen(listener):
                await asyncio.get_running_loop().run_in_executor(None, harness.server.emit_event, "STOP")
                threading.Thread(target=harness.server.emit_event, args=("RESUME",)).start()
                stop = await asyncio.wait_for(listener.get(), TIMEOUT)
                resume = await asyncio.wait_for(listener.get(), TIMEOUT)
            assert (stop["event"], resume["event"]) == ("STOP", "RESUME")
            assert set(stop["timestamp"]) == {"seconds", "microseconds"}
            await qmp.disconnect()

    asyncio.run(scenario())


def test_qemu_qmp_sees_quit_then_shutdown(harness: Harness) -> None:
    async def scenario() -> None:
        qmp = QMPClient("hv-test")
        await qmp.connect(harness.unix_path)
        listener = EventListener("SHUTDOWN")
        with qmp.listen(listener):
            assert await qmp.execute("quit") == {}
            event = await asyncio.wait_for(listener.get(), TIMEOUT)
        assert event["data"]["reason"] == "host-qmp-quit"
        # The server closes after quit; qemu.qmp reports that EOF from disconnect(), which
        # QEMU's own machine.py expects and ignores in the same way.
        try:
            await qmp.disconnect()
        except EOFError:
            pass

    asyncio.run(scenario())
    assert harness.after_calls == ["quit"]


# ------------------------------------------------------------ real-socket fuzz
# Ends any unfinished input: a control character inside a string (even after a pending
# backslash) is an error that discards to the newline, and outside a string the quote
# opens one so the last control character ends it the same way.
RESET = b'\x01\x01"\x01\n'

@settings(max_examples=int(os.environ.get("HV_QMP_FUZZ_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(max_size=2000) | st.lists(
    st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b"\n", b"\r\n", b":", b",", b" ", b'"execute"',
                     b'"query-version"', b'"arguments"', b'"id"', b"\xff", b"\x00", b"1", b"null"]),
    max_size=200).map(b"".join))
def test_fuzz_over_a_real_socket(harness: Harness, data: bytes) -> None:
    client = connect(harness)
    client.send(data)
    client.send(RESET + b'{"execute": "query-version", "id": "fuzz-recover"}\n')
    while True:
        message = client.recv()
        assert set(message) <= {"return", "error", "id", "event"}
        if message.get("id") == "fuzz-recover":
            assert message == {"return": version_info(), "id": "fuzz-recover"}
            break
    client.close()
    expect_works(connect(harness))


def test_close_from_another_thread_waits_for_a_running_command(sockdir: Path) -> None:
    table = CommandTable()
    entered, release = threading.Event(), threading.Event()

    def block(_args: dict[str, Any]) -> Any:
        entered.set()
        release.wait(TIMEOUT)
        return {"finished": True}

    table.register("block", block)
    path = str(sockdir / "b.sock")
    server = QmpServer([SocketSpec("unix", path=path)], table)
    server.emit_event("EARLY")  # before start: nobody to tell, no error
    server.start()
    with pytest.raises(RuntimeError, match="called once"):
        server.start()
    client = RawClient(path)
    assert client.recv() == greeting()
    client.send(b'{"execute": "block"}\n')
    assert entered.wait(TIMEOUT)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started >= 0.1  # it waited for the command to finish
    assert client.recv() == {"return": {"finished": True}}  # and delivered its reply
    assert client.at_eof()
    assert not os.path.exists(path)


def test_event_after_a_reply_survives_an_immediate_close(sockdir: Path) -> None:
    """device_del's DEVICE_DELETED follows its reply; if the VM powers off at that very
    moment (server closed before the loop flushed the reply) the client must still get
    the reply and then the event, never the reply alone."""
    for attempt in range(30):
        path = sockdir / f"r{attempt}"
        path.mkdir()
        ref: list[Harness] = []
        table = build_table(ref)
        handled = threading.Event()

        def unplug(_args: dict[str, Any]) -> Reply:
            handled.set()
            return Reply({}, after=lambda: ref[0].server.emit_event("DEVICE_DELETED", {"device": "hp0"}))

        table.register("device_del", unplug)
        harness = start_harness_with(path, table, ref)
        client = connect(harness)
        client.send(b'{"execute": "device_del"}\r\n')
        assert handled.wait(TIMEOUT)
        harness.server.close()                     # races the serving loop's flush
        assert client.recv() == {"return": {}}
        event = client.recv()
        assert event["event"] == "DEVICE_DELETED" and event["data"] == {"device": "hp0"}
        client.sock.close()


def start_harness_with(sockdir: Path, table: CommandTable, ref: list[Harness]) -> Harness:
    unix_path = str(sockdir / "qmp.sock")
    server = QmpServer([SocketSpec("unix", path=unix_path)], table)
    harness = Harness(server, table, unix_path)
    ref.append(harness)
    server.start()
    return harness
