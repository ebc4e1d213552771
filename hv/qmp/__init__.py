"""hv's QMP monitor: the wire protocol, a command table the machine fills, and the server.

The machine builds a :class:`CommandTable`, registers its commands, starts a
:class:`QmpServer` on the addresses parsed from ``-qmp`` (or ``-chardev``/``-mon``), and
calls :meth:`QmpServer.emit_event` for STOP, RESUME, SHUTDOWN, RESET and the rest.
"""
from hv.qmp.address import (
    QmpAddressError,
    SocketSpec,
    parse_chardev_option,
    parse_mon_option,
    parse_qmp_option,
)
from hv.qmp.commands import ArgSpec, CommandTable, QmpError, Reply
from hv.qmp.protocol import MAX_MESSAGE_BYTES, MAX_NESTING, version_info
from hv.qmp.server import MAX_CLIENTS, QmpServer, QmpServerError

__all__ = [
    "ArgSpec",
    "CommandTable",
    "MAX_CLIENTS",
    "MAX_MESSAGE_BYTES",
    "MAX_NESTING",
    "QmpAddressError",
    "QmpError",
    "QmpServer",
    "QmpServerError",
    "Reply",
    "SocketSpec",
    "parse_chardev_option",
    "parse_mon_option",
    "parse_qmp_option",
    "version_info",
]
