"""The virt device tree: every node and property a Linux kernel needs, read back with hv's
own FDT reader, and (where QEMU is installed) compared node by node with what QEMU 7.2's
``-M virt,gic-version=3,dumpdtb=`` writes for the same devices."""
from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hv import fdt as fdtlib
from hv.boards.virt.layout import GICD_BASE, GICD_SIZE, GICR_BASE, GICR_STRIDE, V2M_BASE, V2M_SIZE
from hv.boards.virt.fdt import build_virt_fdt
from hv.machine.gic_interrupts import PL011_INTID, pci_intx_intid
from hv.boards.virt.layout import PL011_BASE as VIRT_PL011_BASE
from hv.memory import GuestMemory, RegionSpec
from tests.helpers import FIXTURES, require_tool

MIB = 1024 * 1024
RAM = 0x40000000


@pytest.fixture
def tree() -> Iterator[fdtlib.FdtNode]:
    mem = GuestMemory([RegionSpec(RAM, 512 * MIB)])
    try:
        yield fdtlib.parse_fdt(build_virt_fdt(mem, "console=ttyAMA0", smp=3, initrd=(0x48000000, 0x1234)))
    finally:
        mem.close()


def cells(value: bytes) -> list[int]:
    assert len(value) % 4 == 0
    return list(struct.unpack(f">{len(value) // 4}I", value))


def strings(value: bytes) -> list[str]:
    assert value.endswith(b"\0")
    return value[:-1].decode().split("\0")


def by_phandle(root: fdtlib.FdtNode, phandle: int) -> str:
    """The path of the node whose phandle is ``phandle``."""
    def walk(node: fdtlib.FdtNode, path: str) -> str | None:
        if node.props.get("phandle") == struct.pack(">I", phandle):
            return path or "/"
        for child in node.children:
            found = walk(child, f"{path}/{child.name}")
            if found:
                return found
        return None
    found = walk(root, "")
    assert found is not None, f"no node has phandle {phandle:#x}"
    return found


def test_root_chosen_memory(tree: fdtlib.FdtNode) -> None:
    assert cells(tree.props["#address-cells"]) == [2] and cells(tree.props["#size-cells"]) == [2]
    assert by_phandle(tree, cells(tree.props["interrupt-parent"])[0]) == f"/intc@{GICD_BASE:x}"
    chosen = fdtlib.find_node(tree, "/chosen")
    assert strings(chosen.props["bootargs"]) == ["console=ttyAMA0"]
    assert strings(chosen.props["stdout-path"]) == [f"/pl011@{VIRT_PL011_BASE:x}"]
    fdtlib.find_node(tree, strings(chosen.props["stdout-path"])[0])          # names a real node
    assert struct.unpack(">Q", chosen.props["linux,initrd-start"]) == (0x48000000,)
    assert struct.unpack(">Q", chosen.props["linux,initrd-end"]) == (0x48001234,)
    memory = fdtlib.find_node(tree, "/memory@40000000")
    assert strings(memory.props["device_type"]) == ["memory"]
    assert struct.unpack(">QQ", memory.props["reg"]) == (RAM, 512 * MIB)


def test_cpus_and_psci(tree: fdtlib.FdtNode) -> None:
    cpus = fdtlib.find_node(tree, "/cpus")
    assert cells(cpus.props["#address-cells"]) == [1] and cells(cpus.props["#size-cells"]) == [0]
    assert [c.name for c in cpus.children] == ["cpu@0", "cpu@1", "cpu@2"]
    for index, cpu in enumerate(cpus.children):
        assert cells(cpu.props["reg"]) == [index]          # MPIDR_EL1 affinity of vCPU index
        assert strings(cpu.props["enable-method"]) == ["psci"]
        assert strings(cpu.props["device_type"]) == ["cpu"]
    psci = fdtlib.find_node(tree, "/psci")
    assert strings(psci.props["compatible"])[:2] == ["arm,psci-1.0", "arm,psci-0.2"]
    assert strings(psci.props["method"]) == ["hvc"]


def test_timer_ppis(tree: fdtlib.FdtNode) -> None:
    timer = fdtlib.find_node(tree, "/timer")
    assert strings(timer.props["compatible"])[0] == "arm,armv8-timer"
    specs = cells(timer.props["interrupts"])
    triples = [specs[i:i + 3] for i in range(0, len(specs), 3)]
    # secure, non-secure, virtual, hypervisor: PPIs 13, 14, 11, 10 = INTIDs 29, 30, 27, 26;
    # flags 4 (level) as QEMU 7.2 writes them for a GICv3
    assert triples == [[1, 13, 4], [1, 14, 4], [1, 11, 4], [1, 10, 4]]
    assert [16 + ppi for _, ppi, _ in triples] == [29, 30, 27, 26]


def test_gic_v3(tree: fdtlib.FdtNode) -> None:
    intc = fdtlib.find_node(tree, f"/intc@{GICD_BASE:x}")
    assert strings(intc.props["compatible"]) == ["arm,gic-v3"]
    assert cells(intc.props["#interrupt-cells"]) == [3] and intc.props["interrupt-controller"] == b""
    assert cells(intc.props["#redistributor-regions"]) == [1]
    assert struct.unpack(">4Q", intc.props["reg"]) == (GICD_BASE, GICD_SIZE, GICR_BASE, 3 * GICR_STRIDE)
    assert cells(intc.props["interrupts"]) == [1, 9, 4]     # maintenance interrupt, PPI 9
    v2m = fdtlib.find_node(intc, f"v2m@{V2M_BASE:x}")
    assert strings(v2m.props["compatible"]) == ["arm,gic-v2m-frame"] and v2m.props["msi-controller"] == b""
    assert struct.unpack(">2Q", v2m.props["reg"]) == (V2M_BASE, V2M_SIZE)


def test_pl011_and_its_clock(tree: fdtlib.FdtNode) -> None:
    uart = fdtlib.find_node(tree, f"/pl011@{VIRT_PL011_BASE:x}")
    assert strings(uart.props["compatible"]) == ["arm,pl011", "arm,primecell"]
    assert struct.unpack(">2Q", uart.props["reg"]) == (VIRT_PL011_BASE, 0x1000)
    assert cells(uart.props["interrupts"]) == [0, PL011_INTID - 32, 4] == [0, 1, 4]   # SPI 1, level
    assert strings(uart.props["clock-names"]) == ["uartclk", "apb_pclk"]
    clocks = cells(uart.props["clocks"])
    assert len(clocks) == 2 and clocks[0] == clocks[1]
    assert by_phandle(tree, clocks[0]) == "/apb-pclk"
    clk = fdtlib.find_node(tree, "/apb-pclk")
    assert strings(clk.props["compatible"]) == ["fixed-clock"]
    assert cells(clk.props["clock-frequency"]) == [24_000_000] and cells(clk.props["#clock-cells"]) == [0]


def test_pcie_interrupt_map_is_hvs_intx_wiring(tree: fdtlib.FdtNode) -> None:
    pcie = fdtlib.find_node(tree, "/pcie@10000000")
    assert cells(pcie.props["interrupt-map-mask"]) == [0x1800, 0, 0, 7]
    imap = cells(pcie.props["interrupt-map"])
    assert len(imap) == 16 * 10
    for row in (imap[i:i + 10] for i in range(0, len(imap), 10)):
        slot, pin = row[0] >> 11, row[3]
        assert by_phandle(tree, row[4]) == f"/intc@{GICD_BASE:x}"
        assert row[7:] == [0, pci_intx_intid(slot, pin) - 32, 4]
    assert by_phandle(tree, cells(pcie.props["msi-parent"])[0]) == f"/intc@{GICD_BASE:x}/v2m@{V2M_BASE:x}"


# -- against QEMU ---------------------------------------------------------------------------

# (path, property) pairs that must be equal to QEMU's once phandles are turned into paths.
SAME_AS_QEMU = [
    ("/", "#address-cells"), ("/", "#size-cells"), ("/", "compatible"), ("/", "interrupt-parent"),
    ("/chosen", "bootargs"), ("/chosen", "stdout-path"),
    ("/memory@40000000", "reg"), ("/memory@40000000", "device_type"),
    ("/psci", "compatible"), ("/psci", "method"), ("/psci", "cpu_on"), ("/psci", "cpu_off"),
    ("/psci", "cpu_suspend"), ("/psci", "migrate"),
    ("/cpus", "#address-cells"), ("/cpus", "#size-cells"),
    ("/cpus/cpu@0", "reg"), ("/cpus/cpu@0", "enable-method"), ("/cpus/cpu@0", "device_type"),
    ("/cpus/cpu@1", "reg"), ("/cpus/cpu@1", "enable-method"), ("/cpus/cpu@1", "compatible"),
    ("/timer", "compatible"), ("/timer", "interrupts"), ("/timer", "always-on"),
    ("/apb-pclk", "compatible"), ("/apb-pclk", "clock-frequency"), ("/apb-pclk", "#clock-cells"),
    ("/apb-pclk", "clock-output-names"),
    ("/pl011@9000000", "compatible"), ("/pl011@9000000", "reg"), ("/pl011@9000000", "interrupts"),
    ("/pl011@9000000", "clocks"), ("/pl011@9000000", "clock-names"),
    ("/intc@8000000", "compatible"), ("/intc@8000000", "#interrupt-cells"),
    ("/intc@8000000", "interrupt-controller"), ("/intc@8000000", "#redistributor-regions"),
    ("/intc@8000000", "#address-cells"), ("/intc@8000000", "#size-cells"), ("/intc@8000000", "ranges"),
    ("/pcie@10000000", "compatible"), ("/pcie@10000000", "device_type"),
    ("/pcie@10000000", "#address-cells"), ("/pcie@10000000", "#size-cells"),
    ("/pcie@10000000", "#interrupt-cells"), ("/pcie@10000000", "interrupt-map-mask"),
    ("/pcie@10000000", "interrupt-map"), ("/pcie@10000000", "linux,pci-domain"),
    ("/pcie@10000000", "dma-coherent"),
]
PHANDLE_PROPS = {"interrupt-parent": (0, 1), "clocks": (0, 1), "interrupt-map": (4, 10)}


def normalised(root: fdtlib.FdtNode, path: str, prop: str) -> object:
    """The property's value with phandle cells replaced by the paths they name."""
    value = fdtlib.find_node(root, path).props[prop]
    if prop not in PHANDLE_PROPS:
        return value
    first, stride = PHANDLE_PROPS[prop]
    out: list[object] = list(cells(value))
    for i in range(first, len(out), stride):
        out[i] = by_phandle(root, out[i])                   # type: ignore[arg-type]
    return out


@require_tool("qemu-system-aarch64")
def test_tree_matches_qemu_virt_gicv3(tmp_path: Path) -> None:
    dtb = tmp_path / "qemu.dtb"
    subprocess.run(["qemu-system-aarch64", "-M", f"virt,gic-version=3,dumpdtb={dtb}", "-cpu", "cortex-a57",
                    "-smp", "2", "-m", "512", "-display", "none", "-net", "none",
                    "-kernel", str(FIXTURES / "aarch64" / "hello.elf"), "-append", "console=ttyAMA0"],
                   check=True, capture_output=True, timeout=60)
    qemu = fdtlib.parse_fdt(dtb.read_bytes())
    mem = GuestMemory([RegionSpec(RAM, 512 * MIB)])
    try:
        ours = fdtlib.parse_fdt(build_virt_fdt(mem, "console=ttyAMA0", smp=2))
    finally:
        mem.close()
    differences = [f"{path} {prop}: hv {normalised(ours, path, prop)!r}, qemu {normalised(qemu, path, prop)!r}"
                   for path, prop in SAME_AS_QEMU
                   if normalised(ours, path, prop) != normalised(qemu, path, prop)]
    assert not differences, "\n".join(differences)
    # The GIC's distributor is where QEMU's is; hv's redistributor region is exactly its
    # two vCPUs' frames (QEMU declares its whole 0xF60000 window).
    ours_reg = struct.unpack(">4Q", fdtlib.find_node(ours, "/intc@8000000").props["reg"])
    qemu_reg = struct.unpack(">4Q", fdtlib.find_node(qemu, "/intc@8000000").props["reg"])
    assert ours_reg[:3] == qemu_reg[:3] and ours_reg[3] == 2 * GICR_STRIDE <= qemu_reg[3]
