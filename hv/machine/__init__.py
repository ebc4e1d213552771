"""Machines (q35, virt): RAM, buses, devices, vCPU threads and lifecycle."""
from hv.machine.machine import Machine, MachineError, MachineSnapshot, RunState, ram_layout

__all__ = ["Machine", "MachineError", "MachineSnapshot", "RunState", "ram_layout"]
