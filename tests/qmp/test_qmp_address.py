"""-qmp, -chardev and -mon option parsing: accepted spellings and one-line errors."""
from __future__ import annotations

import pytest

from hv.qmp.address import (
    UNIX_PATH_MAX,
    QmpAddressError,
    SocketSpec,
    parse_chardev_option,
    parse_mon_option,
    parse_qmp_option,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("unix:/tmp/qmp.sock,server,nowait", SocketSpec("unix", path="/tmp/qmp.sock")),
        ("unix:path/to/socket1,server,nowait", SocketSpec("unix", path="path/to/socket1")),
        ("unix:/tmp/a,,b,server,nowait", SocketSpec("unix", path="/tmp/a,b")),
        ("unix:/tmp/q,server=on,wait=off", SocketSpec("unix", path="/tmp/q")),
        ("unix:/tmp/q,server", SocketSpec("unix", path="/tmp/q")),
        ("tcp:127.0.0.1:4444,server,nowait", SocketSpec("tcp", host="127.0.0.1", port=4444)),
        ("tcp:[::1]:4444,server,nowait", SocketSpec("tcp", host="::1", port=4444)),
        ("tcp:[fe80::1%eth0]:1,server,nowait", SocketSpec("tcp", host="fe80::1%eth0", port=1)),
        ("tcp:localhost:0,server,nowait", SocketSpec("tcp", host="localhost", port=0)),
        ("tcp:my-host.example.org:65535,server,nowait", SocketSpec("tcp", host="my-host.example.org", port=65535)),
        ("tcp::4444,server,nowait", SocketSpec("tcp", host="", port=4444)),
    ],
)
def test_qmp_option_accepted(value: str, expected: SocketSpec) -> None:
    assert parse_qmp_option(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("unix:/tmp/q,nowait", "'server' is required"),
        ("unix:/tmp/q,server=off,nowait", "'server' is required"),
        ("unix:/tmp/q,server,wait", "use 'nowait'"),
        ("unix:/tmp/q,server,wait=on", "use 'nowait'"),
        ("unix:/tmp/q,server,nowait,bogus", "unknown option 'bogus'"),
        ("unix:/tmp/q,server,server", "given twice"),
        ("unix:/tmp/q,server=maybe", "expects on or off"),
        ("unix:/tmp/q,server,nowait=1", "'nowait' takes no value"),
        ("unix:,server,nowait", "path is empty"),
        ("unix:/" + "x" * UNIX_PATH_MAX + ",server,nowait", "the limit is 107"),
        ("tcp:127.0.0.1,server,nowait", "lacks a port"),
        ("tcp:127.0.0.1:,server,nowait", "not a number"),
        ("tcp:127.0.0.1:http,server,nowait", "not a number"),
        ("tcp:127.0.0.1:65536,server,nowait", "out of range"),
        ("tcp:127.0.0.1:-1,server,nowait", "not a number"),
        ("tcp:::1:4444,server,nowait", "must be written in brackets"),
        ("tcp:[::1:4444,server,nowait", "closing ']'"),
        ("tcp:[]:4444,server,nowait", "is not an IPv6 address"),
        ("tcp:bad host:1,server,nowait", "not a valid host name"),
        ("stdio", "unsupported address 'stdio'"),
        ("telnet:1.2.3.4:5,server,nowait", "unsupported address 'telnet'"),
        ("/tmp/q,server,nowait", "unsupported address"),
        ("unix:/tmp/q,,server", "'server' is required"),  # ",," is a comma in the path
        ("unix:/tmp/q,server,", "empty option"),
    ],
)
def test_qmp_option_rejected_with_one_line(value: str, fragment: str) -> None:
    with pytest.raises(QmpAddressError) as info:
        parse_qmp_option(value)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert message.startswith("-qmp: ")


def test_chardev_unix_and_tcp() -> None:
    assert parse_chardev_option("socket,id=qmp0,path=/tmp/m.sock,server,nowait") == (
        "qmp0", SocketSpec("unix", path="/tmp/m.sock"))
    assert parse_chardev_option("socket,id=m,host=::1,port=5000,server=on,wait=off") == (
        "m", SocketSpec("tcp", host="::1", port=5000))
    assert parse_chardev_option("socket,id=m,host=[::1],port=5000,server,nowait") == (
        "m", SocketSpec("tcp", host="::1", port=5000))
    assert parse_chardev_option("socket,id=m,host=10.0.0.1,port=5000,server,nowait") == (
        "m", SocketSpec("tcp", host="10.0.0.1", port=5000))
    assert parse_chardev_option("socket,id=m,port=7,server,nowait") == ("m", SocketSpec("tcp", port=7))


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("stdio,id=s", "backend 'stdio' cannot carry a monitor"),
        ("socket,path=/tmp/m,server,nowait", "'id' is required"),
        ("socket,id=,path=/tmp/m,server,nowait", "'id' is required"),
        ("socket,id=m,server,nowait", "needs 'path'"),
        ("socket,id=m,path=/tmp/m,nowait", "'server' is required"),
        ("socket,id=m,path=/tmp/m,port=4,server,nowait", "not both"),
        ("socket,id=m,path,server,nowait", "'path' needs a value"),
        ("socket,id=m,id=n,path=/tmp/m,server,nowait", "given twice"),
        ("socket,id=m,path=/tmp/m,server,nowait,reconnect=1", "unknown option 'reconnect'"),
        ("socket,id=m,host=[::1,port=5,server,nowait", "closing ']'"),
        ("socket,id=m,port=99999,server,nowait", "out of range"),
    ],
)
def test_chardev_rejected(value: str, fragment: str) -> None:
    with pytest.raises(QmpAddressError) as info:
        parse_chardev_option(value)
    assert fragment in str(info.value)
    assert str(info.value).startswith("-chardev: ")


def test_mon_option() -> None:
    assert parse_mon_option("chardev=qmp0,mode=control") == "qmp0"
    assert parse_mon_option("mode=control,chardev=x") == "x"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("chardev=qmp0", "mode is missing"),
        ("chardev=qmp0,mode=readline", "mode is 'readline'"),
        ("mode=control", "'chardev' is required"),
        ("chardev=a,chardev=b,mode=control", "given twice"),
        ("chardev=a,mode=control,pretty=on", "unknown option 'pretty=on'"),
        ("chardev,mode=control", "'chardev' needs a value"),
    ],
)
def test_mon_rejected(value: str, fragment: str) -> None:
    with pytest.raises(QmpAddressError) as info:
        parse_mon_option(value)
    assert fragment in str(info.value)
    assert str(info.value).startswith("-mon: ")


def test_socket_spec_str_round_trips() -> None:
    for value in ("unix:/tmp/x", "tcp:[::1]:4", "tcp:127.0.0.1:5", "tcp:host:6"):
        assert str(parse_qmp_option(value + ",server,nowait")) == value
