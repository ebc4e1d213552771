"""GICv3 for the aarch64 virt machine: distributor, one redistributor per vCPU and the
system-register CPU interface (ICC_*_EL1), in one saved device.

Layout as QEMU virt: the distributor (GICD) at 0x08000000 (64 KiB) and, per vCPU ``n``, a
redistributor frame pair at 0x080A0000 + n * 0x20000 (RD_base, then SGI_base 64 KiB
later). One security state (GICD_CTLR.DS = 1) and affinity routing always on (ARE RAO).

| Frame | Offset | Register |
|---|---|---|
| GICD | 0x0000 | CTLR (EnableGrp0 bit 0, EnableGrp1 bit 1, ARE bit 4 RAO, DS bit 6 RAO) |
| GICD | 0x0004 / 0x0008 | TYPER (ITLinesNumber, IDbits) / IIDR |
| GICD / SGI_base | 0x0080 0x0100 0x0180 0x0200 0x0280 0x0300 0x0380 | IGROUPR, IS/ICENABLER, IS/ICPENDR, IS/ICACTIVER |
| GICD / SGI_base | 0x0400 / 0x0C00 | IPRIORITYR (a byte per INTID) / ICFGR (2 bits per INTID) |
| GICD | 0x6000 + 8 * INTID | IROUTER (Aff0 selects the vCPU; IRM=1 means vCPU 0) |
| RD_base | 0x0008 / 0x0014 | TYPER (64 bits: Aff0, processor number, Last) / WAKER |
| all | 0xFFE8 | PIDR2 (ArchRev 3) |

In the distributor, INTIDs 0-31 read as zero (their registers live in each SGI_base).
Registers are accessed as 32-bit words (IPRIORITYR also by byte, IROUTER/GICR_TYPER as
64 bits or two words); other sizes read as zero and writes are ignored.

Interrupts: SGIs 0-15 (edge, from ICC_SGI1R_EL1), PPIs 16-31 and SPIs 32..287 (256 SPIs,
GICD_TYPER.ITLinesNumber 8, as QEMU virt: the GICv2m frame's INTIDs 80-143 and PCI INTx's
35-38 are among them)
(level or edge per ICFGR, driven by :meth:`GicV3.set_level`). A level-sensitive interrupt
is pending while its line is high or its pending latch (ISPENDR) is set; an edge-triggered
one latches pending on a rising edge, until acknowledged. :meth:`GicV3.pulse_spi` sets an
SPI's pending latch directly (a message-signalled edge, from the GICv2m frame). Only Group 1
interrupts are signalled (as IRQ); Group 0 ones (FIQ) are never signalled.

CPU interface (per vCPU): PMR, BPR1, IGRPEN1, CTLR (EOImode bit 1), SRE (reads 7),
IAR1 (acknowledge: pending -> active, priority drop pushed), EOIR1 (priority drop; also
deactivate when EOImode = 0), DIR, RPR, HPPIR1, SGI1R. The running priority is the
group priority (per BPR1) of the highest-priority acknowledged but not yet dropped
interrupt. :meth:`GicV3.signalled` is what the machine uses to raise IRQ on a vCPU: the
highest pending enabled Group 1 interrupt whose priority is below PMR and whose group
priority is above the running priority.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hv.devices.interfaces import DeviceStateError
from hv.devices.persist import plain_dict

log = logging.getLogger(__name__)

# Frame sizes only: where the distributor and redistributors are mapped is the board's
# (hv.boards.virt.layout GICD_BASE/GICR_BASE); the register files see offsets.
GICD_SIZE = 0x1_0000
GICR_STRIDE = 0x2_0000           # RD_base + SGI_base
NUM_IRQS = 288                   # SGIs, PPIs and 256 SPIs (ITLinesNumber = 8), as QEMU virt
LEGACY_NUM_IRQS = 96             # states saved before the GICv2m frame (INTIDs 80-143) had 64 SPIs
SPURIOUS = 1023
PRIVATE = 32
MAX_VCPUS = 123                  # redistributors fit below 0x08000000 + 16 MiB

CTLR_GRP0 = 1 << 0
CTLR_GRP1 = 1 << 1
CTLR_ARE = 1 << 4
CTLR_DS = 1 << 6
WAKER_SLEEP = 1 << 1
WAKER_CHILDREN_ASLEEP = 1 << 2
ICC_CTLR_EOIMODE = 1 << 1
ICC_SRE_VALUE = 0x7              # SRE, DFB, DIB: system registers only
IIDR = 0x0100_043B
PIDR2 = 0x3B

REG_CTLR = 0x0000
REG_TYPER = 0x0004
REG_IIDR = 0x0008
REG_IGROUPR = 0x0080
REG_ISENABLER = 0x0100
REG_ICENABLER = 0x0180
REG_ISPENDR = 0x0200
REG_ICPENDR = 0x0280
REG_ISACTIVER = 0x0300
REG_ICACTIVER = 0x0380
REG_IPRIORITYR = 0x0400
REG_ICFGR = 0x0C00
REG_IROUTER = 0x6000
REG_PIDR2 = 0xFFE8
GICR_TYPER = 0x0008
GICR_WAKER = 0x0014
SGI_FRAME = 0x1_0000

BITMAP_FIELDS = ("group", "enable", "pending", "active", "edge", "line")
_BANKS = {REG_IGROUPR: "group", REG_ISENABLER: "enable", REG_ICENABLER: "enable", REG_ISPENDR: "pending",
          REG_ICPENDR: "pending", REG_ISACTIVER: "active", REG_ICACTIVER: "active"}
_SET_REGS = {REG_ISENABLER, REG_ISPENDR, REG_ISACTIVER}
_CLEAR_REGS = {REG_ICENABLER, REG_ICPENDR, REG_ICACTIVER}

# The ICC_* registers hv implements, by name (as backends name them).
ICC_REGISTERS = ("ICC_PMR_EL1", "ICC_IAR1_EL1", "ICC_EOIR1_EL1", "ICC_HPPIR1_EL1", "ICC_BPR1_EL1",
                 "ICC_CTLR_EL1", "ICC_SRE_EL1", "ICC_IGRPEN1_EL1", "ICC_IGRPEN0_EL1", "ICC_DIR_EL1",
                 "ICC_RPR_EL1", "ICC_SGI1R_EL1", "ICC_AP1R0_EL1", "ICC_AP0R0_EL1", "ICC_IAR0_EL1",
                 "ICC_EOIR0_EL1", "ICC_HPPIR0_EL1", "ICC_BPR0_EL1")


def _check_u(name: str, value: Any, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise DeviceStateError(f"gicv3 state: {name} out of range")
    return value


@dataclass
class GicCpuState:
    """One vCPU's redistributor (SGIs/PPIs, INTIDs 0-31, bit n = INTID n) and CPU interface."""

    group: int = 0
    enable: int = 0
    pending: int = 0              # pending latches
    active: int = 0
    edge: int = 0xFFFF            # ICFGR: SGIs always edge, PPIs level at reset
    line: int = 0                 # PPI input levels
    priority: list[int] = field(default_factory=lambda: [0] * PRIVATE)
    waker: int = WAKER_SLEEP
    pmr: int = 0
    bpr1: int = 0
    igrpen1: int = 0
    igrpen0: int = 0
    ctlr: int = 0
    running: list[int] = field(default_factory=list)   # acknowledged, priority not dropped

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> GicCpuState:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            raise DeviceStateError("gicv3 cpu state: wrong fields")
        st = cls()
        for name in BITMAP_FIELDS:
            setattr(st, name, _check_u(name, raw[name], PRIVATE))
        for name in ("waker", "pmr", "bpr1", "igrpen1", "igrpen0", "ctlr"):
            setattr(st, name, _check_u(name, raw[name], 8))
        prio = raw["priority"]
        if not isinstance(prio, list) or len(prio) != PRIVATE:
            raise DeviceStateError("gicv3 cpu state: priority list has the wrong length")
        st.priority = [_check_u("priority", p, 8) for p in prio]
        running = raw["running"]
        if not isinstance(running, list) or len(running) > NUM_IRQS:
            raise DeviceStateError("gicv3 cpu state: running list malformed")
        st.running = [_check_u("running", i, 10) for i in running]
        if any(i >= NUM_IRQS for i in st.running):
            raise DeviceStateError("gicv3 cpu state: running INTID out of range")
        return st


@dataclass
class GicState:
    """Distributor (SPIs: bit n = INTID n, n >= 32) and every vCPU's part."""

    ctlr: int = 0
    group: int = 0
    enable: int = 0
    pending: int = 0
    active: int = 0
    edge: int = 0
    line: int = 0
    priority: list[int] = field(default_factory=lambda: [0] * NUM_IRQS)
    router: list[int] = field(default_factory=lambda: [0] * NUM_IRQS)
    cpus: list[GicCpuState] = field(default_factory=list)

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> GicState:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            raise DeviceStateError("gicv3 state: wrong fields")
        st = cls(ctlr=_check_u("ctlr", raw["ctlr"], 8))
        spi_mask = ((1 << NUM_IRQS) - 1) & ~((1 << PRIVATE) - 1)
        for name in BITMAP_FIELDS:
            value = _check_u(name, raw[name], NUM_IRQS)
            if value & ~spi_mask:
                raise DeviceStateError(f"gicv3 state: {name} has private INTIDs set")
            setattr(st, name, value)
        for name in ("priority", "router"):
            values = raw[name]
            if not isinstance(values, list) or len(values) not in (NUM_IRQS, LEGACY_NUM_IRQS):
                raise DeviceStateError(f"gicv3 state: {name} list has the wrong length")
            checked = [_check_u(name, v, 8 if name == "priority" else 64) for v in values]
            setattr(st, name, checked + [0] * (NUM_IRQS - len(checked)))   # the extra SPIs at reset
        cpus = raw["cpus"]
        if not isinstance(cpus, list) or not 1 <= len(cpus) <= MAX_VCPUS:
            raise DeviceStateError("gicv3 state: cpu list malformed")
        st.cpus = [GicCpuState.from_dict(c) for c in cpus]
        return st


class GicV3:
    """The GIC of one machine. ``changed(index)`` is called whenever vCPU ``index`` may
    have a new interrupt to signal (the machine kicks or wakes it). Not thread-safe: the
    machine serialises calls with its big lock."""

    def __init__(self, vcpus: int, changed: Callable[[int], None] = lambda index: None) -> None:
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ValueError(f"gicv3: {vcpus} vCPUs not supported (1..{MAX_VCPUS})")
        self.vcpus = vcpus
        self._changed = changed
        self.s = GicState(cpus=[GicCpuState() for _ in range(vcpus)])
        self._reported: set[str] = set()

    # -- persistence ------------------------------------------------------------------
    def save(self) -> GicState:
        return GicState.from_dict(self.s.to_dict())

    def restore(self, state: GicState) -> None:
        if len(state.cpus) != self.vcpus:
            raise DeviceStateError(f"gicv3 state has {len(state.cpus)} vCPUs, machine has {self.vcpus}")
        self.s = GicState.from_dict(state.to_dict())
        for index in range(self.vcpus):
            self._changed(index)

    # -- per-INTID helpers ----------------------------------------------------------------
    def _bank(self, cpu: int, intid: int) -> Any:
        return self.s.cpus[cpu] if intid < PRIVATE else self.s

    def _bit(self, name: str, cpu: int, intid: int) -> bool:
        return bool(getattr(self._bank(cpu, intid), name) >> intid & 1)

    def _set_bit(self, name: str, cpu: int, intid: int, on: bool) -> None:
        bank = self._bank(cpu, intid)
        value = getattr(bank, name)
        setattr(bank, name, value | 1 << intid if on else value & ~(1 << intid))

    def _priority(self, cpu: int, intid: int) -> int:
        return self.s.cpus[cpu].priority[intid] if intid < PRIVATE else self.s.priority[intid]

    def _target(self, intid: int) -> int:
        router = self.s.router[intid]
        aff0 = router & 0xFF
        if router >> 31 & 1 or aff0 >= self.vcpus:
            return 0
        return aff0

    def _pending(self, cpu: int, intid: int) -> bool:
        bank = self._bank(cpu, intid)
        latch = bank.pending >> intid & 1
        level = 0 if bank.edge >> intid & 1 else bank.line >> intid & 1
        return bool(latch or level)

    def _candidates(self, cpu: int) -> list[int]:
        """Pending, enabled, inactive Group 1 INTIDs of vCPU ``cpu`` (Group 1 enabled)."""
        if not self.s.ctlr & CTLR_GRP1:
            return []
        c = self.s.cpus[cpu]
        out = []
        private = (c.pending | (c.line & ~c.edge)) & c.enable & ~c.active & c.group
        while private:
            low = private & -private
            out.append(low.bit_length() - 1)
            private ^= low
        d = self.s
        shared = (d.pending | (d.line & ~d.edge)) & d.enable & ~d.active & d.group
        while shared:                     # the set bits only: most of the 256 SPIs are idle
            low = shared & -shared
            intid = low.bit_length() - 1
            shared ^= low
            if self._target(intid) == cpu:
                out.append(intid)
        return out

    def _highest(self, cpu: int) -> int | None:
        best: int | None = None
        best_prio = 0x100
        for intid in self._candidates(cpu):
            prio = self._priority(cpu, intid)
            if prio < best_prio:
                best, best_prio = intid, prio
        return best

    def _group_mask(self, cpu: int) -> int:
        bpr = max(self.s.cpus[cpu].bpr1, 0)
        return (0xFF << (bpr + 1)) & 0xFF if bpr < 7 else 0

    def running_priority(self, cpu: int) -> int:
        c = self.s.cpus[cpu]
        if not c.running:
            return 0xFF
        return min(self._priority(cpu, i) for i in c.running) & self._group_mask(cpu)

    def signalled(self, cpu: int) -> int | None:
        """The INTID vCPU ``cpu``'s IRQ line would present now (None: IRQ low)."""
        c = self.s.cpus[cpu]
        if not c.igrpen1 & 1:
            return None
        intid = self._highest(cpu)
        if intid is None:
            return None
        prio = self._priority(cpu, intid)
        running = self.running_priority(cpu)
        if prio >= c.pmr or (running != 0xFF and prio & self._group_mask(cpu) >= running):
            return None
        return intid

    # -- inputs ---------------------------------------------------------------------------
    def set_level(self, cpu: int, intid: int, level: bool) -> None:
        """Drive the input of PPI ``intid`` (16-31) of vCPU ``cpu``, or SPI ``intid``
        (``cpu`` ignored). An edge-triggered input latches pending on a rising edge."""
        if not 16 <= intid < NUM_IRQS:
            raise ValueError(f"gicv3: INTID {intid} is not a PPI or SPI")
        if not 0 <= cpu < self.vcpus:
            raise ValueError(f"gicv3: no vCPU {cpu}")
        old = self._bit("line", cpu, intid)
        if old == level:
            return
        self._set_bit("line", cpu, intid, level)
        if level and self._bit("edge", cpu, intid):
            self._set_bit("pending", cpu, intid, True)
        if level:
            self._notify(cpu if intid < PRIVATE else self._target(intid))

    def pulse_spi(self, intid: int) -> None:
        """An edge on SPI ``intid`` (a message, e.g. a GICv2m MSI): set its pending latch,
        whatever ICFGR says, without touching its input line. Acknowledging it (IAR1)
        clears the latch, as for any edge; a second pulse before that is merged."""
        if not PRIVATE <= intid < NUM_IRQS:
            raise ValueError(f"gicv3: INTID {intid} is not an SPI")
        self._set_bit("pending", 0, intid, True)
        self._notify(self._target(intid))

    def _notify(self, cpu: int) -> None:
        if self.signalled(cpu) is not None:
            self._changed(cpu)

    def _notify_all(self) -> None:
        for cpu in range(self.vcpus):
            self._notify(cpu)

    # -- MMIO: distributor ------------------------------------------------------------------
    def _report(self, key: str, message: str, *args: Any) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message, *args)

    def dist_read(self, offset: int, size: int) -> int:
        if REG_IROUTER + 8 * PRIVATE <= offset < REG_IROUTER + 8 * NUM_IRQS:
            return self._router_read(offset, size)
        if size == 1 and REG_IPRIORITYR <= offset < REG_IPRIORITYR + NUM_IRQS:
            intid = offset - REG_IPRIORITYR
            return 0 if intid < PRIVATE else self.s.priority[intid]
        if size != 4 or offset % 4:
            return 0
        if offset == REG_CTLR:
            return (self.s.ctlr & (CTLR_GRP0 | CTLR_GRP1)) | CTLR_ARE | CTLR_DS
        if offset == REG_TYPER:
            return (NUM_IRQS // 32 - 1) | 9 << 19
        if offset == REG_IIDR:
            return IIDR
        if offset == REG_PIDR2:
            return PIDR2
        return self._banked_read(0, offset, first=PRIVATE)

    def dist_write(self, offset: int, size: int, value: int) -> None:
        if REG_IROUTER + 8 * PRIVATE <= offset < REG_IROUTER + 8 * NUM_IRQS:
            self._router_write(offset, size, value)
            return
        if size == 1 and REG_IPRIORITYR <= offset < REG_IPRIORITYR + NUM_IRQS:
            intid = offset - REG_IPRIORITYR
            if intid >= PRIVATE:
                self.s.priority[intid] = value & 0xFF
                self._notify_all()
            return
        if size != 4 or offset % 4:
            self._report(f"d-size-{size}", "gicd: %d-byte access at %#x ignored", size, offset)
            return
        if offset == REG_CTLR:
            self.s.ctlr = value & (CTLR_GRP0 | CTLR_GRP1)
            self._notify_all()
            return
        self._banked_write(0, offset, value, first=PRIVATE)
        self._notify_all()

    def _router_read(self, offset: int, size: int) -> int:
        rel = offset - REG_IROUTER
        intid, half = divmod(rel, 8)
        if intid < PRIVATE or (size, half) not in ((8, 0), (4, 0), (4, 4)):
            return 0
        value = self.s.router[intid]
        return value if size == 8 else (value >> (8 * half)) & 0xFFFF_FFFF

    def _router_write(self, offset: int, size: int, value: int) -> None:
        intid, half = divmod(offset - REG_IROUTER, 8)
        mask = 0xFF_0000_0000 | 0x8000_0000 | 0xFF_FFFF   # Aff3, IRM, Aff2-0
        if size == 8 and half == 0:
            new = value
        elif size == 4 and half in (0, 4):
            old = self.s.router[intid]
            shift = 8 * half
            new = (old & ~(0xFFFF_FFFF << shift)) | (value & 0xFFFF_FFFF) << shift
        else:
            return
        self.s.router[intid] = new & mask
        self._notify_all()

    # -- shared by GICD and SGI_base --------------------------------------------------------
    def _banked_read(self, cpu: int, offset: int, first: int) -> int:
        """32-bit read of a bitmap/priority/config register; INTIDs below ``first`` or
        beyond this bank read as zero."""
        last = PRIVATE if first == 0 else NUM_IRQS
        if REG_IGROUPR <= offset < REG_ICACTIVER + 0x80:
            base = offset & ~0x7F
            intid0 = (offset - base) * 8
            if not first <= intid0 < last:
                return 0
            name = _BANKS[base]
            bank = self.s.cpus[cpu] if first == 0 else self.s
            if name == "pending":
                pend = bank.pending | (bank.line & ~bank.edge)
                return (pend >> intid0) & 0xFFFF_FFFF
            return (getattr(bank, name) >> intid0) & 0xFFFF_FFFF
        if REG_IPRIORITYR <= offset < REG_IPRIORITYR + NUM_IRQS:
            intid0 = offset - REG_IPRIORITYR
            if not first <= intid0 < last:
                return 0
            prios = self.s.cpus[cpu].priority if first == 0 else self.s.priority
            return sum(prios[intid0 + i] << (8 * i) for i in range(4))
        if REG_ICFGR <= offset < REG_ICFGR + NUM_IRQS // 4:
            intid0 = (offset - REG_ICFGR) * 4
            if not first <= intid0 < last:
                return 0
            edge = (self.s.cpus[cpu].edge if first == 0 else self.s.edge) >> intid0
            return sum(2 << (2 * i) for i in range(16) if edge >> i & 1)
        return 0

    def _banked_write(self, cpu: int, offset: int, value: int, first: int) -> None:
        last = PRIVATE if first == 0 else NUM_IRQS
        bank = self.s.cpus[cpu] if first == 0 else self.s
        if REG_IGROUPR <= offset < REG_ICACTIVER + 0x80:
            base = offset & ~0x7F
            intid0 = (offset - base) * 8
            if not first <= intid0 < last:
                return
            name = _BANKS[base]
            bits = (value & 0xFFFF_FFFF) << intid0
            old = getattr(bank, name)
            if base in _SET_REGS:
                new = old | bits
            elif base in _CLEAR_REGS:
                new = old & ~bits
            else:
                new = (old & ~(0xFFFF_FFFF << intid0)) | bits
            setattr(bank, name, new)
            return
        if REG_IPRIORITYR <= offset < REG_IPRIORITYR + NUM_IRQS:
            intid0 = offset - REG_IPRIORITYR
            if first <= intid0 < last:
                prios = bank.priority
                for i in range(4):
                    prios[intid0 + i] = (value >> (8 * i)) & 0xFF
            return
        if REG_ICFGR <= offset < REG_ICFGR + NUM_IRQS // 4:
            intid0 = (offset - REG_ICFGR) * 4
            if not first <= intid0 < last or intid0 < 16:
                return   # SGI configuration is read-only (edge)
            edge = bank.edge
            for i in range(16):
                on = bool(value >> (2 * i + 1) & 1)
                edge = edge | 1 << (intid0 + i) if on else edge & ~(1 << (intid0 + i))
            bank.edge = edge
            return
        self._report(f"w-{first}-{offset:#x}", "gic: write to unimplemented register %#x ignored", offset)

    # -- MMIO: redistributors -----------------------------------------------------------------
    def redist_read(self, offset: int, size: int) -> int:
        cpu, rel = divmod(offset, GICR_STRIDE)
        if cpu >= self.vcpus:
            return 0
        if rel >= SGI_FRAME:
            rel -= SGI_FRAME
            if size == 1 and REG_IPRIORITYR <= rel < REG_IPRIORITYR + PRIVATE:
                return self.s.cpus[cpu].priority[rel - REG_IPRIORITYR]
            if size != 4 or rel % 4:
                return 0
            return self._banked_read(cpu, rel, first=0)
        if rel in (GICR_TYPER, GICR_TYPER + 4) and size in (4, 8):
            typer = cpu << 32 | cpu << 8 | (1 << 4 if cpu == self.vcpus - 1 else 0)
            if size == 8:
                return typer if rel == GICR_TYPER else 0
            return (typer >> (8 * (rel - GICR_TYPER))) & 0xFFFF_FFFF
        if size != 4 or rel % 4:
            return 0
        if rel == GICR_WAKER:
            waker = self.s.cpus[cpu].waker & WAKER_SLEEP
            return waker | (WAKER_CHILDREN_ASLEEP if waker else 0)
        if rel == REG_IIDR:
            return IIDR
        if rel == REG_PIDR2:
            return PIDR2
        return 0

    def redist_write(self, offset: int, size: int, value: int) -> None:
        cpu, rel = divmod(offset, GICR_STRIDE)
        if cpu >= self.vcpus:
            return
        if rel >= SGI_FRAME:
            rel -= SGI_FRAME
            if size == 1 and REG_IPRIORITYR <= rel < REG_IPRIORITYR + PRIVATE:
                self.s.cpus[cpu].priority[rel - REG_IPRIORITYR] = value & 0xFF
            elif size == 4 and not rel % 4:
                self._banked_write(cpu, rel, value, first=0)
            else:
                self._report(f"r-size-{size}", "gicr: %d-byte access at %#x ignored", size, rel)
            self._notify(cpu)
            return
        if rel == GICR_WAKER and size == 4:
            self.s.cpus[cpu].waker = value & WAKER_SLEEP

    # -- CPU interface (system registers) -------------------------------------------------
    def icc_read(self, cpu: int, name: str) -> int | None:
        """Value of ICC register ``name`` for vCPU ``cpu`` (None: not an ICC register hv
        implements). Reading ICC_IAR1_EL1 acknowledges the interrupt."""
        c = self.s.cpus[cpu]
        if name == "ICC_IAR1_EL1":
            intid = self.signalled(cpu)
            if intid is None:
                return SPURIOUS
            self._set_bit("pending", cpu, intid, False)
            self._set_bit("active", cpu, intid, True)
            c.running.append(intid)
            return intid
        if name == "ICC_HPPIR1_EL1":
            intid = self._highest(cpu)
            return SPURIOUS if intid is None else intid
        simple = {"ICC_PMR_EL1": c.pmr, "ICC_BPR1_EL1": c.bpr1, "ICC_IGRPEN1_EL1": c.igrpen1,
                  "ICC_IGRPEN0_EL1": c.igrpen0, "ICC_CTLR_EL1": c.ctlr | 9 << 8,   # IDbits 0 (16), PRIbits 7 (8 bits)
                  "ICC_SRE_EL1": ICC_SRE_VALUE, "ICC_RPR_EL1": self.running_priority(cpu),
                  "ICC_AP1R0_EL1": 0, "ICC_AP0R0_EL1": 0, "ICC_IAR0_EL1": SPURIOUS,
                  "ICC_HPPIR0_EL1": SPURIOUS, "ICC_BPR0_EL1": 0}
        return simple.get(name)

    def icc_write(self, cpu: int, name: str, value: int) -> bool:
        """Write ICC register ``name`` of vCPU ``cpu``; False if hv does not implement it."""
        c = self.s.cpus[cpu]
        if name == "ICC_PMR_EL1":
            c.pmr = value & 0xFF
        elif name == "ICC_BPR1_EL1":
            c.bpr1 = value & 7
        elif name == "ICC_IGRPEN1_EL1":
            c.igrpen1 = value & 1
        elif name == "ICC_IGRPEN0_EL1":
            c.igrpen0 = value & 1
        elif name == "ICC_CTLR_EL1":
            c.ctlr = value & ICC_CTLR_EOIMODE
        elif name == "ICC_EOIR1_EL1":
            intid = value & 0xFFFFFF
            if intid in c.running:
                c.running.remove(intid)
                if not c.ctlr & ICC_CTLR_EOIMODE:
                    self._deactivate(cpu, intid)
            elif intid < NUM_IRQS:
                self._report("eoi-unknown", "gic: EOI of INTID %d that is not running on vCPU %d", intid, cpu)
        elif name == "ICC_DIR_EL1":
            self._deactivate(cpu, value & 0xFFFFFF)
        elif name == "ICC_SGI1R_EL1":
            self._send_sgi(cpu, value)
        elif name in ("ICC_SRE_EL1", "ICC_AP1R0_EL1", "ICC_AP0R0_EL1", "ICC_EOIR0_EL1", "ICC_BPR0_EL1"):
            pass
        else:
            return False
        self._notify(cpu)
        return True

    def _deactivate(self, cpu: int, intid: int) -> None:
        if intid < NUM_IRQS:
            self._set_bit("active", cpu, intid, False)
            if intid >= PRIVATE:
                self._notify(self._target(intid))

    def _send_sgi(self, source: int, value: int) -> None:
        intid = (value >> 24) & 0xF
        aff1 = (value >> 16) & 0xFF
        if value >> 40 & 1:
            targets = [cpu for cpu in range(self.vcpus) if cpu != source]
        elif aff1 or (value >> 32) & 0xFF or (value >> 48) & 0xFF:
            targets = []          # all vCPUs have Aff1-3 = 0
        else:
            targets = [cpu for cpu in range(min(16, self.vcpus)) if value >> cpu & 1]
        for cpu in targets:
            self._set_bit("pending", cpu, intid, True)
            self._notify(cpu)


class GicDistributorWindow:
    """GICD on the MMIO bus."""

    SIZE = GICD_SIZE

    def __init__(self, gic: GicV3) -> None:
        self.gic = gic

    def read(self, offset: int, size: int) -> int:
        return self.gic.dist_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.gic.dist_write(offset, size, value)


class GicRedistributorWindow:
    """All redistributor frame pairs on the MMIO bus (``vcpus * 128 KiB``)."""

    def __init__(self, gic: GicV3) -> None:
        self.gic = gic
        self.SIZE = gic.vcpus * GICR_STRIDE

    def read(self, offset: int, size: int) -> int:
        return self.gic.redist_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.gic.redist_write(offset, size, value)
