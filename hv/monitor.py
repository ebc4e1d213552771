"""The machine's QMP commands and events, on top of the protocol core in :mod:`hv.qmp`.

The protocol core knows nothing of VMs; this module registers the lifecycle commands
(``query-status``, ``stop``, ``cont``, ``system_reset``, ``quit``, ``query-cpus-fast``,
``query-name``) and forwards the machine's events (STOP, RESUME, SHUTDOWN, RESET) to every
connected client. Migration commands are registered by :mod:`hv.migration.manager`.
"""
from __future__ import annotations

import logging
from typing import Any

from hv.machine import Machine, MachineError, RunState
from hv.qmp import CommandTable, QmpError, QmpServer, Reply

log = logging.getLogger(__name__)


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
        machine.add_listener(self.on_machine_event)

    def attach(self, server: QmpServer) -> None:
        self.server = server

    def on_machine_event(self, event: str, data: dict[str, Any] | None) -> None:
        if self.server is not None:
            self.server.emit_event(event, data)

    # -- commands -----------------------------------------------------------------------
    def query_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        state = self.machine.state
        return {"running": state is RunState.RUNNING, "singlestep": False, "status": state.value}

    def stop(self, _args: dict[str, Any]) -> dict[str, Any]:
        self._require_not(RunState.SHUTDOWN, RunState.INMIGRATE)
        try:
            self.machine.pause()
        except MachineError as exc:
            raise QmpError("GenericError", str(exc)) from None
        return {}

    def cont(self, _args: dict[str, Any]) -> dict[str, Any]:
        self._require_not(RunState.SHUTDOWN, RunState.INMIGRATE, RunState.POSTMIGRATE)
        try:
            self.machine.resume()
        except MachineError as exc:
            raise QmpError("GenericError", str(exc)) from None
        return {}

    def system_reset(self, _args: dict[str, Any]) -> dict[str, Any]:
        self._require_not(RunState.SHUTDOWN, RunState.INMIGRATE)
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

    def _require_not(self, *states: RunState) -> None:
        state = self.machine.state
        if state in states:
            raise QmpError("GenericError", f"not possible while the VM is in state '{state.value}'")
