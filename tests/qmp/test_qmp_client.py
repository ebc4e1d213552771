"""The hv-qmp terminal client against a real QMP server."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hv.qmp import version_info
from hv.qmp.client import main, parse_arguments
from tests.qmp.conftest import Harness, wait_for


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_query_over_unix_path_and_tcp(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    host, port = harness.tcp
    for target in (harness.unix_path, f"unix:{harness.unix_path}", f"tcp:{host}:{port}"):
        code, reply, err = run_main(capsys, target, "query-version")
        assert (code, reply, err) == (0, {"return": version_info()}, "")


def test_arguments_json_or_string(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    code, reply, _ = run_main(capsys, harness.unix_path, "typed", "uri=tcp:192.168.0.1:4446", "count=3")
    assert code == 0 and reply == {"return": {"uri": "tcp:192.168.0.1:4446", "count": 3}}
    code, reply, _ = run_main(capsys, harness.unix_path, "echo", 'value={"a": [1, true, null]}')
    assert code == 0 and reply == {"return": {"a": [1, True, None]}}
    assert parse_arguments(["a=1", "b=x y", "c=\"42\"", "d=", "e=NaN", "f=a=b"]) == {
        "a": 1, "b": "x y", "c": "42", "d": "", "e": "NaN", "f": "a=b"}


def test_error_reply_exits_2(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    code, reply, err = run_main(capsys, harness.unix_path, "migrate")
    assert code == 2
    assert reply == {"error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"}}
    assert err == "hv-qmp: migrate failed: GenericError: Parameter 'uri' is missing\n"
    code, reply, err = run_main(capsys, harness.unix_path, "no-such")
    assert code == 2 and reply["error"]["class"] == "CommandNotFound"


def test_events_before_the_reply_are_skipped(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    code, reply, _ = run_main(capsys, harness.unix_path, "emit", "n=4")
    assert code == 0 and reply == {"return": {"emitted": True}}


def test_quit_reply_then_server_gone(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    code, reply, _ = run_main(capsys, harness.unix_path, "quit")
    assert code == 0 and reply == {"return": {}}
    wait_for(lambda: not os.path.exists(harness.unix_path))  # the reply comes before the close
    code, reply, err = run_main(capsys, harness.unix_path, "query-version")
    assert code == 1 and reply is None
    assert err.startswith(f"hv-qmp: cannot connect to unix:{harness.unix_path}: ")
    assert err.count("\n") == 1


def test_connection_failures_exit_1(sockdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, str(sockdir / "absent.sock"), "query-version")
    assert code == 1 and "No such file or directory" in err and err.count("\n") == 1
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    code, _, err = run_main(capsys, f"tcp:127.0.0.1:{port}", "query-version")
    assert code == 1 and "Connection refused" in err
    # Something that accepts but never greets: a clear timeout, not a hang.
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(sockdir / "silent.sock"))
    silent.listen()
    code, _, err = run_main(capsys, "--timeout", "0.3", str(sockdir / "silent.sock"), "query-version")
    silent.close()
    assert code == 1 and err == "hv-qmp: monitor connection failed: timed out\n"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["tcp:nohost", "query-version"], "lacks a port"),
        (["/tmp/x", "cmd", "novalue"], "argument 'novalue' is not key=value"),
        (["/tmp/x", "cmd", "a=1", "a=2"], "argument 'a' given twice"),
        (["/tmp/x", "cmd", "--timeout", "0"], "--timeout must be positive"),
    ],
)
def test_usage_errors_exit_1(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, *argv)
    assert code == 1 and fragment in err


def test_console_script(harness: Harness) -> None:
    """The installed ``hv-qmp`` entry point (or ``python -m``) as a user runs it."""
    command = [shutil.which("hv-qmp")] if shutil.which("hv-qmp") else [sys.executable, "-m", "hv.qmp.client"]
    done = subprocess.run([*command, harness.unix_path, "query-version"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"return": version_info()}
    done = subprocess.run([*command, harness.unix_path, "fail"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"]["class"] == "DeviceNotFound"
