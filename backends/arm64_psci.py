"""PSCI 1.0 (Arm DEN 0022) as hv's Unicorn aarch64 vCPUs answer ``hvc``/``smc``: the
functions every machine has (version, features, system off/reset, no Trusted OS), and the
power functions (CPU_ON/OFF, AFFINITY_INFO) when the machine hands the vCPU a power handler.
"""
from __future__ import annotations

import logging

from hv_backends.base import Exit, ExitReason, PowerHandler

log = logging.getLogger("hv_backends.unicorn_arm64")

PSCI_VERSION = 0x84000000
PSCI_CPU_OFF = 0x84000002
PSCI_CPU_ON_32 = 0x84000003
PSCI_CPU_ON_64 = 0xC4000003
PSCI_AFFINITY_INFO_32 = 0x84000004
PSCI_AFFINITY_INFO_64 = 0xC4000004
PSCI_MIGRATE_INFO_TYPE = 0x84000006
PSCI_SYSTEM_OFF = 0x84000008
PSCI_SYSTEM_RESET = 0x84000009
PSCI_FEATURES = 0x8400000A
# PSCI return codes (PSCI 1.0, section 5.2.2).
PSCI_SUCCESS = 0
PSCI_E_NOT_SUPPORTED = -1
PSCI_E_INVALID_PARAMETERS = -2
PSCI_E_DENIED = -3
PSCI_E_ALREADY_ON = -4
PSCI_E_INVALID_ADDRESS = -9
PSCI_NOT_SUPPORTED = (1 << 64) - 1
PSCI_MIGRATE_NOT_PRESENT = 2            # MIGRATE_INFO_TYPE: no Trusted OS to migrate
PSCI_BASE_FUNCTIONS = frozenset({PSCI_VERSION, PSCI_FEATURES, PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET,
                                 PSCI_MIGRATE_INFO_TYPE})
PSCI_POWER_FUNCTIONS = frozenset({PSCI_CPU_OFF, PSCI_CPU_ON_32, PSCI_CPU_ON_64,
                                  PSCI_AFFINITY_INFO_32, PSCI_AFFINITY_INFO_64})


def psci_call(function: int, args: list[int], power: PowerHandler | None, index: int) -> Exit | int:
    """The outcome of PSCI ``function`` (x0) with ``args`` (x1..x3, already narrowed for the
    32-bit calling convention) on vCPU ``index``: an Exit that ends ``run`` (system off or
    reset, CPU_OFF) or the value for x0."""
    result: int
    if function == PSCI_SYSTEM_OFF:
        return Exit(ExitReason.SYSTEM_OFF, "PSCI SYSTEM_OFF")
    if function == PSCI_SYSTEM_RESET:
        return Exit(ExitReason.SYSTEM_RESET, "PSCI SYSTEM_RESET")
    if function == PSCI_VERSION:
        result = 0x10000
    elif function == PSCI_FEATURES:
        supported = PSCI_BASE_FUNCTIONS | (PSCI_POWER_FUNCTIONS if power is not None else frozenset())
        result = PSCI_SUCCESS if args[0] & 0xFFFFFFFF in supported else PSCI_E_NOT_SUPPORTED
    elif function == PSCI_MIGRATE_INFO_TYPE:
        result = PSCI_MIGRATE_NOT_PRESENT
    elif power is not None and function == PSCI_CPU_OFF:
        log.debug("vCPU %d: PSCI CPU_OFF", index)
        return Exit(ExitReason.CPU_OFF, "PSCI CPU_OFF")
    elif power is not None and function in (PSCI_CPU_ON_32, PSCI_CPU_ON_64):
        result = power.cpu_on(args[0], args[1], args[2])
    elif power is not None and function in (PSCI_AFFINITY_INFO_32, PSCI_AFFINITY_INFO_64):
        result = power.affinity_info(args[0], args[1])
    else:
        log.debug("vCPU %d: PSCI function %#x not supported", index, function)
        result = PSCI_E_NOT_SUPPORTED
    return result
