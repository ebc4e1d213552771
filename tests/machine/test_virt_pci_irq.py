"""PCI interrupts on the aarch64 virt machine: the GICv2m MSI frame, MSI-X messages to it,
wire-OR'd INTx on SPIs 3-6, and the PCI host in the device tree. Real Unicorn vCPUs and
real virtio-blk-pci functions driven through the machine's buses."""
from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hv_backends import backend_class
from hv import fdt as fdtlib
from hv.config import parse_args
from hv.console import BufferSink
from hv.devconfig import parse_device
from hv.boards.virt.layout import V2M_BASE
from hv.devices.gicv2m import V2M_IIDR_VALUE, V2M_MSI_SETSPI_NS, GicV2m
from hv.devices.gicv3 import REG_IGROUPR, REG_IPRIORITYR, REG_ISENABLER
from hv.devices.irqline import SharedLine, SharedLineError, SharedLineInput
from hv.devices.pci import UnconnectedMsi
from hv.boards.virt.fdt import build_virt_fdt
from hv.machine import Machine
from hv.machine.gic_interrupts import GicMsiSink, pci_intx_intid
from hv.machine.machine import MachineSnapshot
from hv.machine.move import copy_ram
from hv.memory import GuestMemory, RegionSpec
from hv.state import PSTATE_EL1H_DAIF, Arm64CpuState
from tests.helpers import FIXTURES, assemble_a64, require_tool
from tests.machine.conftest import T_FLUSH, Driver, make_image

RAM = 0x4000_0000
CODE = RAM + 0x20_0000
READY = RAM + 0x30_0000
RESULT = RAM + 0x30_0008
MSI_INTID = 81                      # v2m SPI 1 (what a fixture guest programs for MSI-X vector 1)
PSCI_SYSTEM_OFF = 0x8400_0008
SPURIOUS = 1023
V2M_DOORBELL = V2M_BASE + V2M_MSI_SETSPI_NS   # the MSI address guests program on virt


# -- the GICv2m register file -----------------------------------------------------------------

def test_v2m_registers_match_qemu_and_setspi_raises_only_its_spis() -> None:
    raised: list[int] = []
    v2m = GicV2m(raised.append, V2M_BASE)
    assert v2m.doorbell == V2M_DOORBELL == 0x0802_0040              # the address MSI-X entries hold
    assert v2m.read(0x008, 4) == 80 << 16 | 64                # MSI_TYPER: INTIDs 80..143
    assert v2m.read(0xFCC, 4) == V2M_IIDR_VALUE == 0x0510_0000  # MSI_IIDR: product 'Q'
    assert all(v2m.read(off, 4) == 0 for off in range(0xFD0, 0x1000, 4))   # PIDR/CIDR
    assert v2m.read(0x004, 4) == v2m.read(0x040, 4) == 0       # unknown / write-only
    assert v2m.read(0x008, 2) == v2m.read(0x008, 8) == 0       # 32-bit only
    v2m.write(0x040, 4, 80)
    v2m.write(0x040, 4, 143)
    assert raised == [80, 143] and v2m.raised == 2
    for bad in (79, 144, 0, 1023, 80 | 1 << 16):               # not one of the frame's INTIDs
        v2m.write(0x040, 4, bad)
    v2m.write(0x040, 2, 81)                                    # 16-bit: ignored
    v2m.write(0x044, 4, 81)                                    # another offset: ignored
    v2m.write(0x008, 4, 0)                                     # TYPER is read-only
    assert raised == [80, 143] and v2m.dropped == 5 and v2m.read(0x008, 4) == 80 << 16 | 64
    with pytest.raises(ValueError):
        GicV2m(raised.append, V2M_BASE, spi_base=16)
    for bad_base in (V2M_BASE + 0x40, -0x1000, 1 << 64):     # not a 4 KiB-aligned 64-bit address
        with pytest.raises(ValueError):
            GicV2m(raised.append, bad_base)


# -- shared INTx lines --------------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.levels.append(level)


def test_shared_line_is_a_wire_or_of_its_inputs() -> None:
    target = Recorder()
    line = SharedLine(target, name="t")
    a, b = line.attach(3 << 3), line.attach(7 << 3)
    a.set_level(True)
    b.set_level(True)
    a.set_level(False)                              # b still drives it
    assert target.levels[-1] is True and line.level and not a.level and b.level
    b.set_level(False)
    assert target.levels[-1] is False and not line.level
    b.set_level(True)
    line.detach(b.key)                              # an unplugged device no longer counts
    assert target.levels[-1] is False and line.inputs == [3 << 3]
    b.set_level(True)                               # a stale input is ignored
    assert target.levels[-1] is False
    with pytest.raises(SharedLineError):
        line.attach(3 << 3)
    with pytest.raises(SharedLineError):
        line.detach(7 << 3)


def test_intx_swizzle_is_qemu_virt_s() -> None:
    assert [pci_intx_intid(0, p) for p in (1, 2, 3, 4)] == [35, 36, 37, 38]
    assert [pci_intx_intid(s, 1) for s in range(6)] == [35, 36, 37, 38, 35, 36]
    with pytest.raises(ValueError):
        pci_intx_intid(1, 0)


# -- the machine ----------------------------------------------------------------------------

def virt_machine(tmp_path: Path, *devices: str, drives: int = 2) -> Machine:
    args = ["-machine", "virt", "-m", "64", "-kernel", str(FIXTURES / "aarch64" / "hello.elf")]
    for n in range(drives):
        image = make_image(tmp_path / f"d{n}.img")
        args += ["-drive", f"file={image},id=d{n},readonly=off,direct=off"]
    for n, spec in enumerate(devices):
        args += ["-device", f"virtio-blk-pci,drive=d{n},id=blk{n},bus=pcie.0,{spec}"]
    return Machine(parse_args(args).config, backend_class("unicorn")(), BufferSink())


def driver(machine: Machine, slot: int, index: int) -> Driver:
    """A Python virtio-blk driver for the function in ``slot``, with its own BAR and rings."""
    d = Driver(machine.pci, machine.memory, machine.pio, machine.mmio, "virt", slot=slot)
    d.bar += index * 0x10000
    for name in ("desc", "avail", "used", "scratch", "data"):
        setattr(d, name, getattr(d, name) + index * 0x4_0000)
    return d


def configure_gic(machine: Machine, intid: int) -> None:
    """What a guest's GIC setup does: Group 1 on, ``intid`` in Group 1 and enabled, vCPU 0
    awake with PMR 0xF0 and IGRPEN1 set."""
    machine.mmio_write(0x0800_0000, 4, 0x12)
    n, bit = divmod(intid, 32)
    machine.mmio_write(0x0800_0000 + REG_IGROUPR + 4 * n, 4, 1 << bit)
    machine.mmio_write(0x0800_0000 + REG_IPRIORITYR + intid, 1, 0x80)
    machine.mmio_write(0x0800_0000 + REG_ISENABLER + 4 * n, 4, 1 << bit)
    machine.mmio_write(0x080A_0014, 4, 0)
    gic = machine.interrupts.gic        # type: ignore[union-attr]
    gic.icc_write(0, "ICC_PMR_EL1", 0xF0)
    gic.icc_write(0, "ICC_IGRPEN1_EL1", 1)


def pending(machine: Machine, intid: int) -> bool:
    return bool(machine.interrupts.gic.s.pending >> intid & 1)   # type: ignore[union-attr]


def spi_line(machine: Machine, intid: int) -> bool:
    return bool(machine.interrupts.gic.s.line >> intid & 1)      # type: ignore[union-attr]


def enable_msix(d: Driver, function: Any, vector: int, address: int, data: int) -> None:
    """Program MSI-X table entry ``vector`` (unmasked) and turn MSI-X on, through the BAR and
    ECAM as a guest driver does."""
    d.program_bar()
    entry = 0x3800 + 16 * vector
    d.w(entry, 4, address & 0xFFFF_FFFF)
    d.w(entry + 4, 4, address >> 32)
    d.w(entry + 8, 4, data)
    d.w(entry + 12, 4, 0)
    d.cfg_write(function.msix.cap + 2, 2, 0x8000)
    assert function.msix.enabled


def test_virt_wires_the_v2m_frame_msix_sinks_and_intx_lines(tmp_path: Path) -> None:
    machine = virt_machine(tmp_path, "addr=3", "addr=4")
    try:
        assert machine.mmio_read(V2M_BASE + 0x008, 4) == 80 << 16 | 64       # the frame is on the bus
        assert "gicv2m" not in machine.devices                             # stateless: not saved
        f3, f4 = machine.pci.host.functions[3 << 3], machine.pci.host.functions[4 << 3]
        assert isinstance(f3.msix.sink, GicMsiSink) and isinstance(f4.msix.sink, GicMsiSink)
        assert isinstance(f3.intx, SharedLineInput) and f3.intx.line is machine.intx_lines[38]
        assert f4.intx.line is machine.intx_lines[35]                       # (4 + 1 - 1) % 4 = 0
        machine.mmio_write(V2M_BASE + 0x040, 4, 100)                       # a guest's own SETSPI_NS write
        assert pending(machine, 100)
    finally:
        machine.close()


def test_msix_message_pends_the_spi_and_bad_messages_are_dropped(tmp_path: Path) -> None:
    machine = virt_machine(tmp_path, "addr=3")
    try:
        configure_gic(machine, MSI_INTID)
        gic = machine.interrupts.gic        # type: ignore[union-attr]
        function = machine.pci.host.functions[3 << 3]
        d = driver(machine, 3, 0)
        enable_msix(d, function, 0, V2M_DOORBELL, MSI_INTID)
        d.init(queue_vector=0)
        assert d.request(T_FLUSH)[0] == 0                   # used buffer -> MSI-X vector 0
        assert pending(machine, MSI_INTID) and gic.signalled(0) == MSI_INTID
        assert d.r(0x1000, 1) == 0 and not any(spi_line(machine, i) for i in range(35, 39))  # no INTx
        assert gic.icc_read(0, "ICC_IAR1_EL1") == MSI_INTID  # acknowledge clears the edge
        gic.icc_write(0, "ICC_EOIR1_EL1", MSI_INTID)
        assert not pending(machine, MSI_INTID) and gic.signalled(0) is None
        # A guest bug: wrong doorbell address (x86's), or an INTID the frame does not own.
        before = gic.save()
        sink = function.msix.sink
        for address, data in ((0xFEE0_0000, MSI_INTID), (V2M_BASE, MSI_INTID), (V2M_DOORBELL, 79),
                              (V2M_DOORBELL, 144), (V2M_DOORBELL, MSI_INTID | 1 << 16)):
            sink.send(address, data)
        enable_msix(d, function, 0, V2M_DOORBELL + 4, MSI_INTID)       # through the device too
        assert d.request(T_FLUSH, head=3)[0] == 0
        assert gic.save() == before and sink.dropped == 6 and sink.sent == 1
    finally:
        machine.close()


def test_intx_of_two_functions_on_one_spi_is_wire_ored_and_follows_the_isr(tmp_path: Path) -> None:
    machine = virt_machine(tmp_path, "addr=3", "addr=7")        # both INTA -> INTID 38
    try:
        intid = pci_intx_intid(3, 1)
        assert intid == pci_intx_intid(7, 1) == 38
        configure_gic(machine, intid)
        gic = machine.interrupts.gic        # type: ignore[union-attr]
        a, b = driver(machine, 3, 0), driver(machine, 7, 1)
        a.init()
        b.init()                                          # MSI-X off: completions raise INTx
        assert a.request(T_FLUSH)[0] == 0
        assert spi_line(machine, intid) and gic.signalled(0) == intid
        assert b.request(T_FLUSH)[0] == 0
        assert a.r(0x1000, 1) == 1                        # read-to-clear lowers a's output...
        assert spi_line(machine, intid) and gic.signalled(0) == intid   # ...b still drives the line
        assert b.r(0x1000, 1) == 1
        assert not spi_line(machine, intid) and gic.signalled(0) is None
        # Level-sensitive: acknowledged while high, it is pending again after EOI.
        assert a.request(T_FLUSH, head=3)[0] == 0
        assert gic.icc_read(0, "ICC_IAR1_EL1") == intid
        gic.icc_write(0, "ICC_EOIR1_EL1", intid)
        assert gic.signalled(0) == intid
        assert a.r(0x1000, 1) == 1 and gic.signalled(0) is None
        # With INTx disabled (command bit 10) an interrupt sets the ISR but not the line.
        b.cfg_write(0x04, 2, 0x406)
        assert b.request(T_FLUSH, head=3)[0] == 0
        assert machine.pci.host.functions[7 << 3].s.isr == 1 and not spi_line(machine, intid)
    finally:
        machine.close()


def test_hotplugged_function_is_wired_and_unplug_leaves_the_shared_line_to_the_others(tmp_path: Path) -> None:
    machine = virt_machine(tmp_path, "addr=3", drives=2)       # d1 is free for device_add
    try:
        slot = machine.hotplug_device(parse_device("virtio-blk-pci,drive=d1,id=hp0,bus=pcie.0,addr=0xb"))
        function = slot.device
        assert isinstance(function.msix.sink, GicMsiSink)
        assert function.intx.line is machine.intx_lines[38] is machine.pci.host.functions[3 << 3].intx.line
        a, h = driver(machine, 3, 0), driver(machine, 11, 1)
        a.init()
        h.init()
        assert h.request(T_FLUSH)[0] == 0 and a.request(T_FLUSH)[0] == 0
        machine.hotunplug_device("hp0")                            # its ISR is still set
        assert spi_line(machine, 38)                               # a still drives INTID 38
        assert isinstance(function.msix.sink, UnconnectedMsi) and machine.intx_lines[38].inputs == [3 << 3]
        assert a.r(0x1000, 1) == 1 and not spi_line(machine, 38)
        # Plugged again, with its completed request's ISR set: nothing stale on the line.
        slot = machine.hotplug_device(parse_device("virtio-blk-pci,drive=d1,id=hp1,bus=pcie.0,addr=0xb"))
        assert not spi_line(machine, 38) and machine.intx_lines[38].inputs == [3 << 3, 11 << 3]
    finally:
        machine.close()


# -- a real vCPU takes the MSI ---------------------------------------------------------------

def vector_table(irq_extra: str = "") -> str:
    """The test guests' VBAR table: the IRQ entry acknowledges the interrupt (ICC_IAR1 /
    ICC_EOIR1), runs ``irq_extra``, and reports the INTID in RESULT; every other entry
    reports 0xE00 + its index; then PSCI SYSTEM_OFF."""
    return f"""
    .macro  VEC n
    .balign 0x80
    mov     w0, #(0xE00 + \\n)       // an unexpected exception: report its entry
    b       done
    .endm
    .macro  IRQVEC
    .balign 0x80
    mrs     x0, s3_0_c12_c12_0       // ICC_IAR1_EL1: acknowledge
    msr     s3_0_c12_c12_1, x0       // ICC_EOIR1_EL1{irq_extra}
    b       done
    .endm

    .balign 0x800
vectors:
    VEC 0
    VEC 1
    VEC 2
    VEC 3
    VEC 4
    IRQVEC
    VEC 6
    VEC 7
    VEC 8
    VEC 9
    VEC 10
    VEC 11
    VEC 12
    VEC 13
    VEC 14
    VEC 15
done:
    ldr     x1, ={RESULT}
    str     w0, [x1]
    ldr     x0, ={PSCI_SYSTEM_OFF}
    hvc     #0
    b       .
"""


GUEST = f"""
_start:
    ldr     x1, =vectors
    msr     vbar_el1, x1
    ldr     x1, =0x08000000          // GICD
    mov     w2, #0x12
    str     w2, [x1]                 // CTLR: ARE, EnableGrp1
    mov     w2, #(1 << ({MSI_INTID} - 64))
    str     w2, [x1, #0x88]          // IGROUPR2: Group 1
    mov     w3, #0x80
    strb    w3, [x1, #(0x400 + {MSI_INTID})]   // IPRIORITYR
    str     w2, [x1, #0x108]         // ISENABLER2
    ldr     x1, =0x080A0000          // GICR of vCPU 0
    str     wzr, [x1, #0x14]         // WAKER: awake
    mov     x2, #0xf0
    msr     s3_0_c4_c6_0, x2         // ICC_PMR_EL1
    mov     x2, #1
    msr     s3_0_c12_c12_7, x2       // ICC_IGRPEN1_EL1
    isb
    ldr     x1, ={READY}
    mov     w2, #1
    str     w2, [x1]
    msr     daifclr, #2
1:  wfi
    b       1b

""" + vector_table()


def move(machine: Machine) -> Machine:
    """Move a paused machine to a fresh one through plain values (snapshot + RAM), the
    images' locks handed over as a live migration does; the fresh one starts paused."""
    snapshot = MachineSnapshot.from_dict(machine.save().to_dict())
    config = dataclasses.replace(machine.config, incoming="unix:/nonexistent/switch-over")
    fresh = Machine(config, backend_class("unicorn")(), machine.console)
    try:
        copy_ram(machine.memory, fresh.memory)
        fresh.restore(snapshot)
    except BaseException:
        fresh.close()
        raise
    machine.close()
    fresh.pci.acquire_locks()
    fresh.start(paused=True)
    return fresh


@pytest.mark.parametrize("moved", [False, True], ids=["running", "moved-while-pending"])
def test_vcpu_takes_the_msix_interrupt(tmp_path: Path, moved: bool) -> None:
    """The guest programs the GIC and waits in WFI; a virtio-blk completion's MSI-X message
    goes to SETSPI_NS and the vCPU takes IRQ 81. ``moved``: the message arrives while the
    machine is paused and the machine moves to a fresh one (GIC state through the snapshot)
    before the vCPU may take it."""
    machine = virt_machine(tmp_path, "addr=3", drives=1)
    try:
        function = machine.pci.host.functions[3 << 3]
        d = driver(machine, 3, 0)
        enable_msix(d, function, 0, V2M_DOORBELL, MSI_INTID)
        d.init(queue_vector=0)
        machine.memory.write(CODE, assemble_a64(GUEST, CODE))
        machine.vcpus[0].set_state(Arm64CpuState(pc=CODE, pstate=PSTATE_EL1H_DAIF))
        machine.start()
        deadline = time.monotonic() + 20
        while machine.memory.read_int(READY, 4) != 1:
            assert time.monotonic() < deadline and machine.state.value == "running", "guest never got ready"
            time.sleep(0.005)
        time.sleep(0.02)                                           # let it reach WFI
        if moved:
            assert machine.pause()
        with machine._lock:                                        # as a vCPU's notify write would
            assert d.request(T_FLUSH)[0] == 0
        if moved:
            assert pending(machine, MSI_INTID) and machine.memory.read_int(RESULT, 4) == 0
            machine = move(machine)
            assert pending(machine, MSI_INTID)                    # the pending edge moved with the GIC
            assert machine.resume()
        assert machine.wait_shutdown(20) == "guest-shutdown"
        assert machine.memory.read_int(RESULT, 4) == MSI_INTID
        assert not pending(machine, MSI_INTID)
        assert machine.interrupts.injected[0] >= 1                # type: ignore[union-attr]
    finally:
        machine.close()


def test_saved_pending_msi_spi_restores_into_a_new_machine(tmp_path: Path) -> None:
    source = virt_machine(tmp_path, "addr=3", drives=1)
    try:
        configure_gic(source, MSI_INTID)
        source.pci.host.functions[3 << 3].msix.sink.send(V2M_DOORBELL, MSI_INTID)
        snapshot = source.save()
        assert int(snapshot.devices["gic"]["state"]["pending"]) >> MSI_INTID & 1
    finally:
        source.close()
    target = virt_machine(tmp_path, "addr=3", drives=1)
    try:
        assert not pending(target, MSI_INTID)
        target.restore(snapshot)
        gic = target.interrupts.gic         # type: ignore[union-attr]
        assert pending(target, MSI_INTID) and gic.signalled(0) == MSI_INTID
        assert gic.icc_read(0, "ICC_IAR1_EL1") == MSI_INTID and not pending(target, MSI_INTID)
    finally:
        target.close()


# -- the device tree --------------------------------------------------------------------------

def virt_fdt() -> bytes:
    mem = GuestMemory([RegionSpec(RAM, 16 << 20)])
    try:
        return build_virt_fdt(mem, "x", smp=2)
    finally:
        mem.close()


def cells(raw: bytes) -> list[int]:
    return [int.from_bytes(raw[i:i + 4], "big") for i in range(0, len(raw), 4)]


def test_device_tree_describes_the_pci_host_v2m_frame_and_intx_map() -> None:
    root = fdtlib.parse_fdt(virt_fdt())
    intc = fdtlib.find_node(root, "/intc@8000000")
    assert cells(intc.props["#address-cells"]) == [2] and cells(intc.props["#size-cells"]) == [2]
    assert intc.props["ranges"] == b""
    v2m = fdtlib.find_node(root, "/intc@8000000/v2m@8020000")
    assert v2m.props["compatible"] == b"arm,gic-v2m-frame\0" and v2m.props["msi-controller"] == b""
    assert v2m.props["reg"] == fdtlib.prop_u64(0x0802_0000, 0x1000)
    pcie = fdtlib.find_node(root, "/pcie@10000000")
    p = pcie.props
    assert p["compatible"] == b"pci-host-ecam-generic\0" and p["device_type"] == b"pci\0"
    assert p["reg"] == fdtlib.prop_u64(0x3F00_0000, 16 << 20)
    assert cells(p["bus-range"]) == [0, 15]
    assert cells(p["#address-cells"]) == [3] and cells(p["#size-cells"]) == [2]
    assert cells(p["#interrupt-cells"]) == [1] and "dma-coherent" in p
    assert cells(p["ranges"]) == [0x0100_0000, 0, 0, 0, 0x3EFF_0000, 0, 0x1_0000,
                                  0x0200_0000, 0, 0x1000_0000, 0, 0x1000_0000, 0, 0x2EFF_0000]
    assert p["msi-parent"] == v2m.props["phandle"] and v2m.props["phandle"] != intc.props["phandle"]
    assert cells(p["interrupt-map-mask"]) == [0x1800, 0, 0, 7]
    gic = cells(intc.props["phandle"])[0]
    entries = cells(p["interrupt-map"])
    assert len(entries) == 16 * 10
    seen = {}
    for i in range(16):
        unit_hi, _, _, pin, parent, _, _, kind, spi, flags = entries[10 * i:10 * (i + 1)]
        assert parent == gic and kind == 0 and flags == 4                # SPI, level high
        seen[(unit_hi >> 11, pin)] = spi
    assert seen == {(s, p): 3 + (s + p - 1) % 4 for s in range(4) for p in range(1, 5)}


QEMU_IRQ_MAP = [  # QEMU virt's pcie interrupt-map (qemu-system-aarch64 -M virt,gic-version=2,dumpdtb), phandle 0x8002
    0x00, 0, 0, 1, 3, 0x00, 0, 0, 2, 4, 0x00, 0, 0, 3, 5, 0x00, 0, 0, 4, 6,
    0x800, 0, 0, 1, 4, 0x800, 0, 0, 2, 5, 0x800, 0, 0, 3, 6, 0x800, 0, 0, 4, 3,
    0x1000, 0, 0, 1, 5, 0x1000, 0, 0, 2, 6, 0x1000, 0, 0, 3, 3, 0x1000, 0, 0, 4, 4,
    0x1800, 0, 0, 1, 6, 0x1800, 0, 0, 2, 3, 0x1800, 0, 0, 3, 4, 0x1800, 0, 0, 4, 5]


def test_interrupt_map_is_qemu_virt_s() -> None:
    root = fdtlib.parse_fdt(virt_fdt())
    entries = cells(fdtlib.find_node(root, "/pcie@10000000").props["interrupt-map"])
    ours = []
    for i in range(16):
        e = entries[10 * i:10 * (i + 1)]
        ours += [e[0], e[1], e[2], e[3], e[8]]
    assert ours == QEMU_IRQ_MAP


@require_tool("dtc")
def test_dtc_accepts_the_virt_device_tree(tmp_path: Path) -> None:
    blob = tmp_path / "virt.dtb"
    blob.write_bytes(virt_fdt())
    result = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(blob)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr                      # no warnings
    assert 'compatible = "pci-host-ecam-generic";' in result.stdout
    assert "msi-controller;" in result.stdout and "v2m@8020000 {" in result.stdout


# -- Unicorn's interrupt window: taken right after the guest unmasks --------------------------

GO = RAM + 0x30_0010
MASKED_GUEST = f"""
_start:
    ldr     x1, =vectors
    msr     vbar_el1, x1
    ldr     x1, ={READY}
    mov     w2, #1
    str     w2, [x1]
    ldr     x1, ={GO}
1:  ldr     w2, [x1]                 // interrupts masked (PSTATE.I) until the host says go
    cbz     w2, 1b
    mov     x3, #0
    msr     daifclr, #2              // unmask: the pending IRQ must be taken right here
2:  add     x3, x3, #1               // ... not after this loop ran for a retry period
    b       2b

""" + vector_table(f"""
    ldr     x1, ={RESULT}
    str     x3, [x1, #8]             // loop iterations before the IRQ""")


def test_pending_irq_is_taken_at_the_unmasking_instruction(tmp_path: Path) -> None:
    """An SPI pends while the guest runs with PSTATE.I set; the guest then unmasks and
    counts. The IRQ arrives before the first count (the armed interrupt window stops the
    engine at the block after ``msr daifclr``), not a retry period (~200 us) later."""
    machine = virt_machine(tmp_path, drives=0)
    try:
        configure_gic(machine, MSI_INTID)
        machine.memory.write(CODE, assemble_a64(MASKED_GUEST, CODE))
        machine.vcpus[0].set_state(Arm64CpuState(pc=CODE, pstate=PSTATE_EL1H_DAIF))
        machine.start()
        deadline = time.monotonic() + 20
        while machine.memory.read_int(READY, 4) != 1:
            assert time.monotonic() < deadline and machine.state.value == "running", "guest never got ready"
            time.sleep(0.005)
        with machine._lock:
            machine.interrupts.gic.pulse_spi(MSI_INTID)            # type: ignore[union-attr]
        time.sleep(0.05)                                           # the guest spins masked meanwhile
        machine.memory.write_int(GO, 4, 1)
        assert machine.wait_shutdown(20) == "guest-shutdown"
        assert machine.memory.read_int(RESULT, 4) == MSI_INTID
        assert machine.memory.read_int(RESULT + 8, 8) == 0         # not one loop iteration ran
        assert machine.vcpus[0].window_exits >= 1                  # type: ignore[attr-defined]
    finally:
        machine.close()
