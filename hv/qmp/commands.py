"""The command table: registration, argument checking and dispatch of QMP commands.

The machine registers its commands here (``stop``, ``cont``, ``quit``, ``migrate``...);
the server only frames, decodes and routes. Each command declares its arguments with
:class:`ArgSpec`, so every handler receives a dictionary that already has the right keys
and JSON types. Dispatch holds a lock: commands run one at a time across every client
and every server sharing the table, so handlers need not be re-entrant.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hv.errors import MonitorError
from hv.qmp.protocol import version_info

__all__ = [
    "ArgSpec",
    "CommandTable",
    "ERROR_CLASSES",
    "Handler",
    "QmpError",
    "Reply",
]

log = logging.getLogger(__name__)

#: The error classes QEMU's QAPI defines; handlers may raise any of them.
ERROR_CLASSES = frozenset(
    {"GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap"}
)

# JSON type name -> (predicate, word used in error messages)
_JSON_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "string": (lambda v: isinstance(v, str), "string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "number"),
    "bool": (lambda v: isinstance(v, bool), "boolean"),
    "object": (lambda v: isinstance(v, dict), "object"),
    "array": (lambda v: isinstance(v, list), "array"),
    "null": (lambda v: v is None, "null"),
    "any": (lambda v: True, "any value"),
}


class QmpError(MonitorError):
    """A command failed; the client receives ``{"error": {"class": error_class, "desc": desc}}``."""

    def __init__(self, error_class: str, desc: str) -> None:
        if error_class not in ERROR_CLASSES:
            raise ValueError(f"unknown QMP error class {error_class!r}")
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class ArgSpec:
    """One argument of a command: its allowed JSON type(s) and whether it must be given.

    ``types`` names one or more of: string, int, number (int or float), bool, object,
    array, null, any.
    """

    types: str | tuple[str, ...]
    required: bool = True

    def __post_init__(self) -> None:
        names = (self.types,) if isinstance(self.types, str) else self.types
        if not names:
            raise ValueError("ArgSpec needs at least one type")
        for name in names:
            if name not in _JSON_TYPES:
                raise ValueError(f"unknown JSON type {name!r} (one of {sorted(_JSON_TYPES)})")
        object.__setattr__(self, "types", tuple(names))

    def accepts(self, value: Any) -> bool:
        return any(_JSON_TYPES[name][0](value) for name in self.types)

    def describe(self) -> str:
        return " or ".join(_JSON_TYPES[name][1] for name in self.types)


@dataclass(frozen=True)
class Reply:
    """A handler's result when something must happen after the reply reaches the client.

    ``after`` runs once the reply has been written to the client's socket (or the client
    has gone); the machine's ``quit`` uses it to shut down after answering.
    """

    value: Any = None
    after: Callable[[], None] | None = None


Handler = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class _Command:
    name: str
    handler: Handler
    params: dict[str, ArgSpec] | None
    doc: str


@dataclass
class CommandTable:
    """Registered commands; :meth:`dispatch` checks arguments and calls the handler."""

    _commands: dict[str, _Command] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.register("qmp_capabilities", self._qmp_capabilities,
                      {"enable": ArgSpec("array", required=False)},
                      "Leave capabilities negotiation (optional in hv: commands work without it).")
        self.register("query-version", lambda _args: version_info(), None,
                      "The hv version, in QEMU's version layout.")
        self.register("query-commands", self._query_commands, None,
                      "The names of every command this monitor accepts.")

    @property
    def lock(self) -> threading.RLock:
        """Held while a command runs; take it to exclude commands from a machine thread."""
        return self._lock

    def register(self, name: str, handler: Handler, params: dict[str, ArgSpec] | None = None,
                 doc: str = "") -> None:
        """Add command ``name``; ``handler(arguments)`` returns a JSON value, a Reply, or None.

        ``params`` None means the command takes no arguments. A handler signals failure
        by raising :class:`QmpError`; any other exception becomes a GenericError.
        """
        if not name or not isinstance(name, str):
            raise ValueError("a command needs a non-empty name")
        if not callable(handler):
            raise TypeError(f"handler of {name!r} is not callable")
        with self._lock:
            if name in self._commands:
                raise ValueError(f"command {name!r} is already registered")
            self._commands[name] = _Command(name, handler, dict(params) if params else None, doc)

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._commands.pop(name, None) is None:
                raise KeyError(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._commands)

    def doc(self, name: str) -> str:
        with self._lock:
            return self._commands[name].doc

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._commands

    def check_arguments(self, name: str, params: dict[str, ArgSpec] | None,
                        arguments: dict[str, Any]) -> None:
        """Raise a GenericError naming the first unknown, missing or mistyped argument."""
        specs = params or {}
        for key in arguments:
            if key not in specs:
                raise QmpError("GenericError", f"Invalid parameter '{key}'")
        for key, spec in specs.items():
            if key not in arguments:
                if spec.required:
                    raise QmpError("GenericError", f"Parameter '{key}' is missing")
                continue
            if not spec.accepts(arguments[key]):
                raise QmpError("GenericError", f"Parameter '{key}' expects {spec.describe()}")

    def dispatch(self, name: str, arguments: dict[str, Any]) -> Reply:
        """Run command ``name``; returns its Reply (value None becomes ``{}``) or raises QmpError."""
        with self._lock:
            command = self._commands.get(name)
            if command is None:
                raise QmpError("CommandNotFound", f"The command {name} has not been found")
            self.check_arguments(name, command.params, arguments)
            try:
                result = command.handler(dict(arguments))
            except QmpError:
                raise
            except Exception as exc:  # a handler bug must not take the monitor down
                log.exception("QMP command %s failed", name)
                raise QmpError("GenericError", f"internal error in {name}: {exc}") from exc
        reply = result if isinstance(result, Reply) else Reply(result)
        if reply.value is None:
            reply = Reply({}, reply.after)
        return reply

    def _qmp_capabilities(self, arguments: dict[str, Any]) -> dict[str, Any]:
        for capability in arguments.get("enable", []):
            if not isinstance(capability, str):
                raise QmpError("GenericError", "Parameter 'enable' expects an array of strings")
            raise QmpError("GenericError", f"Capability '{capability}' is not available")
        return {}

    def _query_commands(self, _arguments: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": name} for name in self.names()]
