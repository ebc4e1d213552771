"""PCIe root port (``-device pcie-root-port``): a PCI-to-PCI bridge with a native PCIe
hot-plug slot, so hot-plug and hot-unplug are visible to a guest (Linux ``pciehp``).

Configuration space (QEMU's ``pcie-root-port`` identity, 1b36:000c, class 0x060400):

| offset | what |
|---|---|
| 0x00-0x3F | type 1 header (:class:`hv.devices.pci.PciBridge`): bus numbers, windows, bridge control; INTx pin A |
| 0x40 | PCI Express capability v2, Root Port, Slot Implemented (60 bytes) |
| 0x7C | MSI capability: 64-bit address, one vector (the hot-plug interrupt) |

PCIe capability registers (offsets from 0x40):

* Link Capabilities (+0x0C): 2.5 GT/s x1, Data Link Layer Link Active Reporting Capable,
  port number = ``port``. Link Status (+0x12): 2.5 GT/s x1, DLL Link Active while a
  device is in the slot.
* Slot Capabilities (+0x14): Hot-Plug Surprise, Hot-Plug Capable, No Command Completed
  Support, physical slot number = ``slot`` (``port`` when not given). No attention
  button, power controller, MRL or indicators: the slot is always powered.
* Slot Control (+0x18): guest-writable enables; the interrupt is raised for Presence
  Detect Changed (PDCE), Data Link Layer State Changed (DLLSCE), and the other enable/
  status pairs, when Hot-Plug Interrupt Enable (HPIE) is set.
* Slot Status (+0x1A): Presence Detect State (read-only), and the RW1C events Attention
  Button Pressed, Power Fault, MRL Sensor Changed, Presence Detect Changed, Command
  Completed and Data Link Layer State Changed.

Hot-plug model: *surprise*. :meth:`PcieRootPort.plug` (after the wiring attached the
function) sets Presence Detect State and DLL Link Active and raises the events Presence
Detect Changed + DLL State Changed; :meth:`PcieRootPort.unplug` (after the function left)
clears presence and link and raises the same two events. Linux ``pciehp`` handles both on
a surprise-capable slot (it enables the slot on link up/presence, and removes the device
on link down/presence loss). The host never waits for the guest, so ``device_del``
completes at once. (StratoVirt and QEMU instead model an attention button and wait for
the guest to power the slot off before the device goes; hv's fixture guests have no
pciehp, and ``device_del`` must never hang.)

The hot-plug interrupt: as the spec (PCIe r5.0 6.7.3.4) has it, the port's interrupt
condition is HPIE && (an enabled event bit is set). With MSI enabled one message is sent
when the condition becomes true; otherwise INTx (pin A) follows the condition (unless
the command register disables INTx). The condition is a pure function of configuration
space, so the saved state is the configuration bytes alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hv.devices.interfaces import DeviceStateError, InterruptLine, UnconnectedLine, checked_fields
from hv.devices.pci import (
    CAP_ID_MSI,
    CAP_ID_PCIE,
    COMMAND,
    COMMAND_INTX_DISABLE,
    SAVED_CONFIG_SIZE,
    STATUS,
    STATUS_INTERRUPT,
    MsiSink,
    PciBridge,
    PciError,
    PciFunction,
    UnconnectedMsi,
    parse_hex_bytes,
)
from hv.devices.persist import plain_dict

log = logging.getLogger(__name__)

VENDOR_REDHAT = 0x1B36
DEVICE_ROOT_PORT = 0x000C
CLASS_PCI_BRIDGE = 0x060400

# PCI Express capability (offsets from the capability's start).
EXP_FLAGS = 0x02
EXP_DEVCAP = 0x04
EXP_DEVCTL = 0x08
EXP_DEVSTA = 0x0A
EXP_LNKCAP = 0x0C
EXP_LNKCTL = 0x10
EXP_LNKSTA = 0x12
EXP_SLTCAP = 0x14
EXP_SLTCTL = 0x18
EXP_SLTSTA = 0x1A
EXP_RTCTL = 0x1C
EXP_CAP_SIZE = 0x3C      # version 2: through Slot Status 2

EXP_FLAGS_V2 = 0x0002
EXP_TYPE_ROOT_PORT = 0x4 << 4
EXP_FLAGS_SLOT = 0x0100

DEVCAP_RBER = 1 << 15
LNKCAP_SPEED_2_5 = 0x1
LNKCAP_WIDTH_X1 = 0x1 << 4
LNKCAP_DLLLARC = 1 << 20
LNKSTA_DLLLA = 1 << 13

SLTCAP_HPS = 1 << 5       # Hot-Plug Surprise
SLTCAP_HPC = 1 << 6       # Hot-Plug Capable
SLTCAP_NCCS = 1 << 18     # No Command Completed Support
SLTCAP_PSN_SHIFT = 19
PHYSICAL_SLOT_MAX = (1 << 13) - 1

SLTCTL_ABPE = 1 << 0
SLTCTL_PFDE = 1 << 1
SLTCTL_MRLSCE = 1 << 2
SLTCTL_PDCE = 1 << 3
SLTCTL_CCIE = 1 << 4
SLTCTL_HPIE = 1 << 5
SLTCTL_DLLSCE = 1 << 12
SLTCTL_WRITABLE = 0x17FF  # enables, indicator and power controller controls (EIC reads 0)

SLTSTA_ABP = 1 << 0
SLTSTA_PFD = 1 << 1
SLTSTA_MRLSC = 1 << 2
SLTSTA_PDC = 1 << 3
SLTSTA_CC = 1 << 4
SLTSTA_PDS = 1 << 6
SLTSTA_DLLSC = 1 << 8
SLTSTA_EVENTS = SLTSTA_ABP | SLTSTA_PFD | SLTSTA_MRLSC | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC

# MSI capability, 64-bit address, no per-vector masking.
MSI_CONTROL = 0x02
MSI_ADDRESS_LO = 0x04
MSI_ADDRESS_HI = 0x08
MSI_DATA = 0x0C
MSI_CONTROL_ENABLE = 0x0001
MSI_CONTROL_64BIT = 0x0080

INTERRUPT_PIN_A = 1


@dataclass
class PcieRootPortState:
    """The configuration bytes as hex ("" = power-on: as built, bus numbers as firmware
    assigned them, no events pending)."""

    config: str = ""

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> PcieRootPortState:
        raw = checked_fields(raw, cls, "pcie-root-port")
        config = raw["config"]
        if not isinstance(config, str):
            raise DeviceStateError("pcie-root-port state: bad config")
        if config:
            parse_hex_bytes(config, SAVED_CONFIG_SIZE, "pcie-root-port state config")
        return cls(config)


class PcieRootPort(PciBridge):
    """A PCIe root port with one hot-plug slot (see the module docstring).

    ``port`` is the Link Capabilities port number, ``chassis`` is kept for the
    fingerprint (no slot-numbering capability is exposed), ``slot`` the physical slot
    number (default ``port``). ``msi`` and ``intx`` are wired by the machine.
    """

    def __init__(self, port: int, chassis: int = 0, slot: int | None = None, multifunction: bool = False,
                 msi: MsiSink | None = None, intx: InterruptLine | None = None) -> None:
        physical = port if slot is None else slot
        if not 0 <= port < 256 or not 0 <= chassis < 256 or not 0 <= physical <= PHYSICAL_SLOT_MAX:
            raise PciError(f"port={port}/chassis={chassis}/slot={physical} out of range")
        super().__init__(VENDOR_REDHAT, DEVICE_ROOT_PORT, CLASS_PCI_BRIDGE, interrupt_pin=INTERRUPT_PIN_A,
                         multifunction=multifunction)
        self.port = port
        self.chassis = chassis
        self.physical_slot = physical
        self.msi_sink: MsiSink = msi if msi is not None else UnconnectedMsi()
        self.intx: InterruptLine = intx if intx is not None else UnconnectedLine()
        self.firmware_buses = (0, 0, 0)   # what firmware programmed; a reset puts it back
        self.devfn: int | None = None      # where on pcie.0 (set by the wiring)
        self.exp = self.add_capability(CAP_ID_PCIE, self._exp_body(), self._exp_wmask())
        self.w1cmask[self.exp + EXP_SLTSTA:self.exp + EXP_SLTSTA + 2] = SLTSTA_EVENTS.to_bytes(2, "little")
        self.w1cmask[self.exp + EXP_DEVSTA:self.exp + EXP_DEVSTA + 2] = (0x000F).to_bytes(2, "little")
        msi_body = (MSI_CONTROL_64BIT.to_bytes(2, "little") + bytes(10))
        msi_wmask = (MSI_CONTROL_ENABLE.to_bytes(2, "little") + (0xFFFFFFFC).to_bytes(4, "little")
                     + (0xFFFFFFFF).to_bytes(4, "little") + (0xFFFF).to_bytes(2, "little"))
        self.msi = self.add_capability(CAP_ID_MSI, msi_body, msi_wmask)
        self._asserted = False    # the interrupt condition when last evaluated

    def _exp_body(self) -> bytes:
        body = bytearray(EXP_CAP_SIZE - 2)

        def put(offset: int, size: int, value: int) -> None:
            body[offset - 2:offset - 2 + size] = value.to_bytes(size, "little")

        put(EXP_FLAGS, 2, EXP_FLAGS_V2 | EXP_TYPE_ROOT_PORT | EXP_FLAGS_SLOT)
        put(EXP_DEVCAP, 4, DEVCAP_RBER)
        put(EXP_LNKCAP, 4, LNKCAP_SPEED_2_5 | LNKCAP_WIDTH_X1 | LNKCAP_DLLLARC | self.port << 24)
        put(EXP_LNKSTA, 2, LNKCAP_SPEED_2_5 | LNKCAP_WIDTH_X1)
        put(EXP_SLTCAP, 4, SLTCAP_HPS | SLTCAP_HPC | SLTCAP_NCCS | self.physical_slot << SLTCAP_PSN_SHIFT)
        return bytes(body)

    @staticmethod
    def _exp_wmask() -> bytes:
        mask = bytearray(EXP_CAP_SIZE - 2)

        def put(offset: int, size: int, value: int) -> None:
            mask[offset - 2:offset - 2 + size] = value.to_bytes(size, "little")

        put(EXP_DEVCTL, 2, 0x7CFF)       # error reporting, payload/read request sizes, ...
        put(EXP_LNKCTL, 2, 0x01C3)       # ASPM control, RCB, common clock, extended synch
        put(EXP_SLTCTL, 2, SLTCTL_WRITABLE)
        put(EXP_RTCTL, 2, 0x001F)
        return bytes(mask)

    # -- registers -------------------------------------------------------------------------
    def _exp(self, offset: int, size: int = 2) -> int:
        return self._get(self.exp + offset, size)

    def _set_exp(self, offset: int, set_bits: int = 0, clear_bits: int = 0) -> None:
        value = (self._exp(offset) | set_bits) & ~clear_bits & 0xFFFF
        self._put(self.exp + offset, 2, value)

    @property
    def slot_control(self) -> int:
        return self._exp(EXP_SLTCTL)

    @property
    def slot_status(self) -> int:
        return self._exp(EXP_SLTSTA)

    @property
    def link_status(self) -> int:
        return self._exp(EXP_LNKSTA)

    @property
    def msi_enabled(self) -> bool:
        return bool(self._get(self.msi + MSI_CONTROL, 2) & MSI_CONTROL_ENABLE)

    # -- hot-plug --------------------------------------------------------------------------
    @property
    def occupied(self) -> bool:
        return bool(self.children)

    def attach(self, function: PciFunction, fn: int) -> None:
        """A function enters the slot (cold: presence and link are set, no event)."""
        super().attach(function, fn)
        self._set_exp(EXP_SLTSTA, SLTSTA_PDS)
        self._set_exp(EXP_LNKSTA, LNKSTA_DLLLA)

    def detach(self, fn: int) -> PciFunction | None:
        """A function leaves; with the slot empty, presence and link go (no event)."""
        function = super().detach(fn)
        if not self.children:
            self._set_exp(EXP_SLTSTA, clear_bits=SLTSTA_PDS)
            self._set_exp(EXP_LNKSTA, clear_bits=LNKSTA_DLLLA)
        return function

    def plug(self) -> None:
        """Hot-plug event (after :meth:`attach`): presence and link up, Presence Detect
        Changed and DLL State Changed set, interrupt if enabled."""
        if not self.children:
            raise PciError("pcie-root-port: plug() with an empty slot")
        self._set_exp(EXP_SLTSTA, SLTSTA_PDS | SLTSTA_PDC | SLTSTA_DLLSC)
        self._set_exp(EXP_LNKSTA, LNKSTA_DLLLA)
        self.update_interrupt()

    def unplug(self) -> None:
        """Hot-unplug event (after :meth:`detach`): with the slot empty presence and link
        go down; Presence Detect Changed and DLL State Changed set, interrupt if enabled."""
        if not self.children:
            self._set_exp(EXP_SLTSTA, clear_bits=SLTSTA_PDS)
            self._set_exp(EXP_LNKSTA, clear_bits=LNKSTA_DLLLA)
        self._set_exp(EXP_SLTSTA, SLTSTA_PDC | SLTSTA_DLLSC)
        self.update_interrupt()

    # -- the hot-plug interrupt ------------------------------------------------------------------
    def interrupt_condition(self) -> bool:
        """HPIE and an enabled event pending (PCIe r5.0 6.7.3.4)."""
        control, status = self.slot_control, self.slot_status
        if not control & SLTCTL_HPIE:
            return False
        pending = status & control & (SLTSTA_ABP | SLTSTA_PFD | SLTSTA_MRLSC | SLTSTA_PDC | SLTSTA_CC)
        if status & SLTSTA_DLLSC and control & SLTCTL_DLLSCE:
            pending |= SLTSTA_DLLSC
        return bool(pending)

    def update_interrupt(self, send: bool = True) -> None:
        """Re-evaluate the condition: an MSI on its rising edge (``send``), else INTx
        follows it. ``send=False`` (restore) only re-drives INTx."""
        asserted = self.interrupt_condition()
        rising = asserted and not self._asserted
        self._asserted = asserted
        if self.msi_enabled:
            self._drive_intx(False)
            if rising and send:
                address = self._get(self.msi + MSI_ADDRESS_LO, 4) | self._get(self.msi + MSI_ADDRESS_HI, 4) << 32
                self.msi_sink.send(address, self._get(self.msi + MSI_DATA, 2))
            return
        self._drive_intx(asserted and not self.command & COMMAND_INTX_DISABLE)

    def _drive_intx(self, level: bool) -> None:
        status = self._get(STATUS, 2)
        self._put(STATUS, 2, status | STATUS_INTERRUPT if level else status & ~STATUS_INTERRUPT)
        self.intx.set_level(level)

    def drive_intx(self) -> None:
        """Re-drive the INTx output (the machine calls this after wiring it)."""
        self.update_interrupt(send=False)

    def config_written(self, offset: int, size: int) -> None:
        end = offset + size

        def touches(start: int, length: int) -> bool:
            return offset < start + length and start < end

        if (touches(COMMAND, 2) or touches(self.exp + EXP_SLTCTL, 4)
                or touches(self.msi + MSI_CONTROL, 2)):
            self.update_interrupt()

    # -- persistence -----------------------------------------------------------------------
    def reset_to_firmware(self) -> None:
        """Power-on values, then the bus numbers firmware assigned."""
        self.reset_config()
        self.set_bus_numbers(*self.firmware_buses)

    def save(self) -> PcieRootPortState:
        return PcieRootPortState(self.config_bytes().hex())

    def restore(self, state: PcieRootPortState) -> None:
        if state.config:
            raw = parse_hex_bytes(state.config, SAVED_CONFIG_SIZE, "pcie-root-port state config")
            self.load_config(raw)
        else:
            self.reset_to_firmware()
        # Presence and link are the slot's contents here, not the saved bytes (read-only).
        self._asserted = self.interrupt_condition()   # no message for an old edge
        self.update_interrupt(send=False)
