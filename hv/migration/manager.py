"""Migration over QMP: ``migrate``, ``migrate_cancel``, ``query-migrate`` and parameters.

One :class:`MigrationManager` per hv process, on the source and on the destination (whose
incoming migration updates the same status, so its ``query-migrate`` answers while it
receives). Status changes are sent as ``MIGRATION`` events, dirty rounds as
``MIGRATION_PASS``, a change of convergence as ``MIGRATION_NOT_CONVERGING`` /
``MIGRATION_CONVERGING``.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from hv.machine import Machine, MachineError, RunState
from hv.migration.engine import MigrationParameters, OutgoingMigration, save_snapshot
from hv.migration.status import MigrationStatus
from hv.migration.stream_format import MAX_CHANNELS
from hv.migration.tls import TlsConfigError, TlsCreds, TlsHandshakeError, TlsObjects, make_creds, wrap_client
from hv.migration.transport import (
    MigrationConnectError,
    MigrationUri,
    MigrationUriError,
    SnapshotError,
    connect,
    parse_migration_uri,
)
from hv.qmp import ArgSpec, CommandTable, QmpError
from hv.textsafe import printable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
# parameter name -> (attribute, lowest, highest)
PARAMETERS: dict[str, tuple[str, int, int]] = {
    "downtime-limit": ("downtime_limit", 0, 2_000_000),
    "max-bandwidth": ("max_bandwidth", 0, 1 << 50),
    "max-iterations": ("max_iterations", 1, 1000),
    "cpu-throttle-initial": ("cpu_throttle_initial", 1, 99),
    "cpu-throttle-increment": ("cpu_throttle_increment", 1, 99),
    "max-cpu-throttle": ("max_cpu_throttle", 1, 99),
    "x-stall-timeout": ("stall_timeout", 1, 3600),  # seconds; hv's own (see docs/qmp.md)
    "multifd-channels": ("multifd_channels", 1, MAX_CHANNELS),  # connections (docs/migration-stream.md)
}
CAPABILITIES = {"auto-converge": "auto_converge"}
# Capabilities hv always has: 'events' (MIGRATION / MIGRATION_PASS are always sent).
# Setting one to true is a no-op; false is refused, since hv cannot turn it off.
ALWAYS_ON_CAPABILITIES = ("events",)
# string parameters (QEMU's TLS ones): name -> attribute of MigrationManager
TLS_PARAMETERS = {"tls-creds": "tls_creds", "tls-hostname": "tls_hostname"}


def _generic(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


class MigrationManager:
    def __init__(self, machine: Machine, commands: CommandTable,
                 emit: Callable[[str, dict[str, Any] | None], None], tls_objects: tuple[TlsCreds, ...] = ()) -> None:
        self.machine = machine
        self.tls = TlsObjects(tls_objects)
        self.tls_creds = ""      # migrate-set-parameters tls-creds: '' is plain TCP/UNIX
        self.tls_hostname = ""   # host name the destination's certificate must carry ('' : the URI's)
        self.emit = emit
        self.status = MigrationStatus()
        self.status.add_listener(lambda state: emit("MIGRATION", {"status": state}))
        self.params = MigrationParameters()
        self.outgoing: OutgoingMigration | None = None
        self._snapshot_thread: threading.Thread | None = None
        commands.register("migrate", self.migrate,
                          {"uri": ArgSpec("string"), "blk": ArgSpec("bool", required=False),
                           "inc": ArgSpec("bool", required=False), "detach": ArgSpec("bool", required=False),
                           "resume": ArgSpec("bool", required=False)},
                          doc="Migrate to tcp:HOST:PORT, unix:PATH, or snapshot to file:DIR.")
        commands.register("migrate_cancel", self.migrate_cancel, doc="Cancel the migration in progress.")
        commands.register("query-migrate", self.query_migrate, doc="Migration status and statistics.")
        commands.register("migrate-set-parameters", self.set_parameters,
                          {**{name: ArgSpec("int", required=False) for name in PARAMETERS},
                           **{name: ArgSpec(("string", "null"), required=False) for name in TLS_PARAMETERS}},
                          doc="Set downtime-limit (ms), max-bandwidth (bytes/s), max-iterations, throttling, "
                              "x-stall-timeout (s).")
        commands.register("query-migrate-parameters", self.query_parameters, doc="Current migration parameters.")
        commands.register("migrate-set-capabilities", self.set_capabilities,
                          {"capabilities": ArgSpec("array")}, doc="Turn auto-converge on or off.")
        commands.register("query-migrate-capabilities", self.query_capabilities, doc="Migration capabilities.")
        commands.register("object-add", self.object_add,
                          {"qom-type": ArgSpec("string"), "id": ArgSpec("string"),
                           "endpoint": ArgSpec("string", required=False), "dir": ArgSpec("string", required=False),
                           "verify-peer": ArgSpec("bool", required=False)},
                          doc="Add a tls-creds-x509 object (TLS credentials for migration).")
        commands.register("object-del", self.object_del, {"id": ArgSpec("string")},
                          doc="Remove a tls-creds-x509 object.")

    # -- migrate -------------------------------------------------------------------------------
    def migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("blk") or args.get("inc"):
            raise _generic("block migration (blk/inc) is not supported: share or copy the image")
        if args.get("resume"):
            raise _generic("postcopy resume is not supported")
        if self.status.is_active():
            raise _generic("a migration is already in progress")
        try:
            self.machine.require_state("migrate", RunState.PRELAUNCH, RunState.RUNNING, RunState.PAUSED,
                                       RunState.POSTMIGRATE,
                                       message="cannot migrate while the VM is in state '{state}'")
        except MachineError as exc:
            raise _generic(str(exc)) from None
        try:
            uri = parse_migration_uri(args["uri"])
        except MigrationUriError as exc:
            raise _generic(str(exc)) from None
        self.status.start(self.machine.memory.size)
        if uri.scheme == "file":
            self.outgoing = None  # migrate_cancel must not act on a finished migration
            self._snapshot_thread = threading.Thread(target=self._snapshot, args=(uri.path,),
                                                     name="snapshot", daemon=True)
            self._snapshot_thread.start()
            return {}
        try:
            sock = connect(uri, CONNECT_TIMEOUT)
            if self.tls_creds:
                sock = wrap_client(sock, self.tls.get(self.tls_creds), self.tls_hostname or uri.host)
        except (MigrationConnectError, TlsConfigError, TlsHandshakeError) as exc:
            self.status.fail(str(exc))
            raise _generic(str(exc)) from None
        # Data channels (format 1.6) connect like the main connection; not over TLS, whose
        # encryption makes one connection's bytes cost more than spreading them saves.
        open_channel = None if self.tls_creds else functools.partial(connect, uri, CONNECT_TIMEOUT)
        self.outgoing = OutgoingMigration(self.machine, self.status, self.params, sock, self.emit,
                                          open_channel)
        self.outgoing.start()
        return {}

    def _snapshot(self, directory: str) -> None:
        was_running = self.machine.running
        try:
            save_snapshot(self.machine, directory, self.status)
        except Exception as exc:  # a snapshot failure leaves the VM as it was
            reason = str(exc) if isinstance(exc, (OSError, ValueError)) else repr(exc)
            log.error("snapshot failed: %s", reason)
            if was_running:
                self.machine.resume()
            self.status.fail(reason)
            return
        self.status.complete(None)
        log.info("snapshot written to %s; VM paused", directory)

    def migrate_cancel(self, _args: dict[str, Any]) -> dict[str, Any]:
        if not self.status.is_active():
            raise _generic("no migration in progress")
        if self.outgoing is None:  # a file: snapshot: short, written atomically
            raise _generic("a snapshot to file: cannot be canceled")
        self.outgoing.cancel()
        return {}

    def query_migrate(self, _args: dict[str, Any]) -> dict[str, Any]:
        return self.status.to_qmp()

    # -- parameters ----------------------------------------------------------------------------
    def set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        updates = {}
        tls_updates = {TLS_PARAMETERS[name]: value or "" for name, value in args.items() if name in TLS_PARAMETERS}
        if tls_updates and self.status.is_active():
            raise _generic("tls-creds/tls-hostname cannot change while a migration is in progress")
        for name, value in args.items():
            if name in TLS_PARAMETERS:
                continue
            attribute, low, high = PARAMETERS[name]
            if not low <= value <= high:
                raise _generic(f"Parameter '{name}' expects a value between {low} and {high}")
            updates[attribute] = value
        for attribute, value in updates.items():
            setattr(self.params, attribute, value)
        for attribute, value in tls_updates.items():
            setattr(self, attribute, value)
        return {}

    def query_parameters(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {**self.params.to_qmp(), "tls-creds": self.tls_creds, "tls-hostname": self.tls_hostname}

    # -- object-add / object-del (tls-creds-x509 only) -----------------------------------------
    def object_add(self, args: dict[str, Any]) -> dict[str, Any]:
        props = dict(args)
        qom_type = props.pop("qom-type")
        if qom_type != "tls-creds-x509":
            raise _generic(f"object-add: unsupported qom-type {printable(qom_type)!r} (hv supports tls-creds-x509)")
        try:
            self.tls.add(make_creds(props))
        except TlsConfigError as exc:
            raise _generic(str(exc)) from None
        return {}

    def object_del(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["id"] == self.tls_creds and self.status.is_active():
            raise _generic(f"object '{printable(args['id'])}' is in use by the migration in progress")
        try:
            self.tls.remove(args["id"])
        except TlsConfigError as exc:
            raise _generic(str(exc)) from None
        return {}

    def set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.status.is_active():
            raise _generic("capabilities cannot change while a migration is in progress")
        updates = {}
        for index, item in enumerate(args["capabilities"]):
            if not isinstance(item, dict) or set(item) != {"capability", "state"}:
                raise _generic(f"capabilities[{index}]: expected {{'capability': NAME, 'state': BOOL}}")
            name, state = item["capability"], item["state"]
            if name not in CAPABILITIES and name not in ALWAYS_ON_CAPABILITIES:
                raise _generic(f"capabilities[{index}]: unknown capability {name!r} "
                               f"(supported: {', '.join([*CAPABILITIES, *ALWAYS_ON_CAPABILITIES])})")
            if not isinstance(state, bool):
                raise _generic(f"capabilities[{index}]: 'state' must be a boolean")
            if name in ALWAYS_ON_CAPABILITIES:
                if not state:
                    raise _generic(f"capabilities[{index}]: capability {name!r} is always on in hv "
                                   "and cannot be turned off")
                continue
            updates[CAPABILITIES[name]] = state
        for attribute, state in updates.items():
            setattr(self.params, attribute, state)
        return {}

    def query_capabilities(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"capability": name, "state": getattr(self.params, attribute)}
                for name, attribute in CAPABILITIES.items()] + \
            [{"capability": name, "state": True} for name in ALWAYS_ON_CAPABILITIES]

    # -- migrate-incoming (-incoming defer, as libvirt drives QEMU) ---------------------------
    def register_incoming(self, commands: CommandTable, start: Callable[[MigrationUri], None],
                          started: bool) -> None:
        """Register ``migrate-incoming``, with QEMU's rules and error texts.

        ``started`` is True when the command line already named the incoming URI (then the
        command only says so). Otherwise it works once, while the VM is 'inmigrate'
        (``-incoming defer``): ``start(uri)`` listens (or opens the snapshot) at once, so a
        bad URI or a busy address is this command's GenericError and a later one may
        still succeed; it raises MigrationUriError, MigrationConnectError or SnapshotError.
        """
        self._incoming_started = started

        def migrate_incoming(args: dict[str, Any]) -> dict[str, Any]:
            if self._incoming_started:
                raise _generic("The incoming migration has already been started")
            try:
                self.machine.require_state("migrate-incoming", RunState.INMIGRATE,
                                           message="'-incoming' was not specified on the command line")
            except MachineError as exc:
                raise _generic(str(exc)) from None
            try:
                start(parse_migration_uri(args["uri"]))
            except (MigrationUriError, MigrationConnectError, SnapshotError) as exc:
                raise _generic(f"migrate-incoming: {exc}") from None
            self._incoming_started = True
            return {}

        commands.register("migrate-incoming", migrate_incoming, {"uri": ArgSpec("string")},
                          doc="With -incoming defer: receive from tcp:HOST:PORT, unix:PATH or file:DIR.")
