"""The machine's QMP commands and events, on top of the protocol core in :mod:`hv.qmp`.

The protocol core knows nothing of VMs; this module registers the lifecycle commands
(``query-status``, ``stop``, ``cont``, ``system_reset``, ``quit``, ``query-cpus-fast``,
``query-name``) and forwards the machine's events (STOP, RESUME, SHUTDOWN, RESET) to every
connected client. Migration commands are registered by :mod:`hv.migration.manager`.
"""
from __future__ import annotations

import logging
from typing import Any

from hv.devconfig import DEVICE_DRIVERS, DevConfigError, device_config
from hv.machine import Machine, MachineError, RunState
from hv.machine.pci_wiring import HOTPLUG_DRIVERS
from hv.qmp import ArgSpec, CommandTable, QmpError, QmpServer, Reply

log = logging.getLogger(__name__)
#: States in which stop and system_reset may run (not shut down, not receiving a migration).
_STOPPABLE = (RunState.PRELAUNCH, RunState.RUNNING, RunState.PAUSED, RunState.POSTMIGRATE, RunState.INTERNAL_ERROR)


class MachineMonitor:
    """Binds one machine to a QMP command table and server."""

    def __init__(self, machine: Machine, commands: CommandTable, name: str | None) -> None:
        self.machine = machine
        self.commands = commands
        self.name = name
        self.server: QmpServer | None = None
        commands.register("query-status", self.query_status, doc="The VM's run state.")
        commands.register("stop", self.stop, doc="Pause every vCPU (STOP event).")
        commands.register("cont", self.cont, doc="Resume the vCPUs (RESUME event).")
        commands.register("system_reset", self.system_reset, doc="Reset the machine (RESET event).")
        commands.register("quit", self.quit, doc="End hv after replying (SHUTDOWN event).")
        commands.register("query-cpus-fast", self.query_cpus_fast, doc="vCPUs and their host threads.")
        commands.register("query-name", self.query_name, doc="The -name of the VM.")
        self._migration_status = "none"   # from MIGRATION events: no hot-plug while one runs
        self.register_hotplug(commands)
        machine.add_listener(self.on_machine_event)

    def attach(self, server: QmpServer) -> None:
        self.server = server

    def on_machine_event(self, event: str, data: dict[str, Any] | None) -> None:
        if event == "MIGRATION" and data is not None:
            self._migration_status = str(data.get("status"))
        if self.server is not None:
            self.server.emit_event(event, data)

    # -- commands -----------------------------------------------------------------------
    def query_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        state = self.machine.state
        return {"running": state is RunState.RUNNING, "singlestep": False, "status": state.value}

    def stop(self, _args: dict[str, Any]) -> dict[str, Any]:
        self._require("stop", *_STOPPABLE)
        try:
            self.machine.pause()
        except MachineError as exc:
            raise QmpError("GenericError", str(exc)) from None
        return {}

    def cont(self, _args: dict[str, Any]) -> dict[str, Any]:
        self._require("cont", RunState.PRELAUNCH, RunState.RUNNING, RunState.PAUSED, RunState.INTERNAL_ERROR)
        try:
            self.machine.resume()
        except MachineError as exc:
            raise QmpError("GenericError", str(exc)) from None
        return {}

    def system_reset(self, _args: dict[str, Any]) -> dict[str, Any]:
        self._require("system_reset", *_STOPPABLE)
        self.machine.system_reset()
        return {}

    def quit(self, _args: dict[str, Any]) -> Reply:
        return Reply({}, after=lambda: self.machine.request_shutdown("host-qmp-quit"))

    def query_cpus_fast(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        target = self.machine.arch.value
        return [{"cpu-index": i, "qom-path": f"/machine/unattached/device[{i}]",
                 "thread-id": tid, "target": target, "props": {"core-id": i, "thread-id": 0, "socket-id": 0}}
                for i, tid in enumerate(self.machine.vcpu_thread_ids())]

    def query_name(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"name": self.name} if self.name is not None else {}

    def _require(self, command: str, *allowed: RunState, message: str = "not possible while the VM is in "
                                                                            "state '{state}'") -> None:
        """A GenericError unless the run state is one of ``allowed`` (the machine's check)."""
        try:
            self.machine.require_state(command, *allowed, message=message)
        except MachineError as exc:
            raise QmpError("GenericError", str(exc)) from None

    # -- hot-plug ---------------------------------------------------------------------------
    HOTPLUG_DRIVERS = HOTPLUG_DRIVERS
    DEVICE_ADD_PROPS = ("drive", "netdev", "mac", "bus", "addr", "serial")

    def register_hotplug(self, commands: CommandTable) -> None:
        """``device_add`` / ``device_del`` for virtio-blk-pci and virtio-net-pci (see
        :meth:`device_add`)."""
        text = ArgSpec("string", required=False)
        commands.register("device_add", self.device_add,
                          {"driver": ArgSpec("string"), "id": ArgSpec("string"), "drive": text, "netdev": text,
                           "mac": text, "bus": text, "addr": ArgSpec(("string", "int"), required=False),
                           "serial": text},
                          doc="Hot-plug virtio-blk-pci for a -drive, or virtio-net-pci for a -netdev, that no "
                              "device uses (id, drive|netdev, mac, bus, addr).")
        commands.register("device_del", self.device_del, {"id": ArgSpec("string")},
                          doc="Hot-unplug a PCI device; DEVICE_DELETED follows the reply.")

    def device_add(self, args: dict[str, Any]) -> dict[str, Any]:
        """Plug a virtio-blk-pci or virtio-net-pci function at once: on pcie.0 the guest
        sees it on its next PCI scan; on a root port's bus (``bus=pcie.1,addr=0``) the
        port raises its hot-plug event and interrupt.

        The arguments are those of ``-device`` (driver, id, drive or netdev, mac, bus,
        addr, serial); ``drive``/``netdev`` name a ``-drive``/``-netdev`` of the command
        line that no device uses. Any problem is a GenericError naming it, and nothing
        changes.
        """
        driver = args["driver"]
        if driver not in self.HOTPLUG_DRIVERS:
            known = "known but not hot-pluggable" if driver in DEVICE_DRIVERS else "unknown"
            raise QmpError("GenericError", f"device_add: driver '{driver}' is {known} "
                                           f"(hot-pluggable: {', '.join(self.HOTPLUG_DRIVERS)})")
        self._require_no_migration("device_add")
        props = {"id": args["id"]}
        for key in self.DEVICE_ADD_PROPS:
            if key not in args:
                continue
            value = args[key]
            if isinstance(value, bool):
                raise QmpError("GenericError", f"Parameter '{key}' expects a string")
            if isinstance(value, int):   # addr as a slot number
                if not 0 <= value < 32:
                    raise QmpError("GenericError", f"device_add: addr={value}: slot out of range 0-31")
                value = f"{value:#x}"
            if not value or "," in value or "=" in value:   # as -device would read it
                raise QmpError("GenericError", f"device_add: {key}={value!r}: must be non-empty, "
                                               "without ',' or '='")
            props[key] = value
        try:
            device = device_config("device_add", driver, props)
        except DevConfigError as exc:
            raise QmpError("GenericError", str(exc)) from None
        try:
            self.machine.hotplug_device(device)
        except MachineError as exc:
            raise QmpError("GenericError", str(exc)) from None
        return {}

    def device_del(self, args: dict[str, Any]) -> Reply:
        """Unplug at once; DEVICE_DELETED is sent right after the reply, as QEMU sends it
        once the guest has let go. Behind a ``pcie-root-port`` the slot signals a surprise
        removal (presence/link down, hot-plug interrupt); hv never waits for the guest."""
        device_id = args["id"]
        self._require_no_migration("device_del")
        try:
            self.machine.hotunplug_device(device_id)
        except MachineError as exc:
            raise QmpError("GenericError", str(exc)) from None
        data = {"device": device_id, "path": f"/machine/peripheral/{device_id}"}
        return Reply({}, after=lambda: self.on_machine_event("DEVICE_DELETED", data))

    def _require_no_migration(self, command: str) -> None:
        if self._migration_status in ("setup", "active"):
            raise QmpError("GenericError", f"{command}: not allowed while migrating")
        self._require(command, *(state for state in RunState if state is not RunState.INMIGRATE),
                      message="{command}: not allowed while migrating")
