"""Machines (q35, virt): RAM, buses, devices, vCPU threads and lifecycle."""
from hv.machine.machine import Machine, MachineSnapshot, ram_layout
from hv.machine.runstate import IllegalTransition, MachineError, RunState

__all__ = ["IllegalTransition", "Machine", "MachineError", "MachineSnapshot", "RunState", "ram_layout"]
