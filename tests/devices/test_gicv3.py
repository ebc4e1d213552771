"""GICv3 model: distributor/redistributor registers, the CPU interface's acknowledge/EOI
and priority rules, SGIs, and state validation."""
from __future__ import annotations

import pytest

from hv.devices.gicv3 import (GICR_STRIDE, REG_ICFGR, REG_IGROUPR, REG_IPRIORITYR, REG_IROUTER, REG_ISENABLER,
                              REG_ISPENDR, SGI_FRAME, SPURIOUS, GicState, GicV3)
from hv.devices.interfaces import DeviceStateError


def make(vcpus: int = 2) -> tuple[GicV3, list[int]]:
    changed: list[int] = []
    gic = GicV3(vcpus, changed.append)
    gic.dist_write(0, 4, 0x12)                       # ARE + EnableGrp1
    for cpu in range(vcpus):
        gic.redist_write(cpu * GICR_STRIDE + 0x14, 4, 0)        # wake the redistributor
        gic.icc_write(cpu, "ICC_PMR_EL1", 0xF0)
        gic.icc_write(cpu, "ICC_IGRPEN1_EL1", 1)
    return gic, changed


def enable_ppi(gic: GicV3, cpu: int, intid: int, prio: int) -> None:
    sgi = cpu * GICR_STRIDE + SGI_FRAME
    gic.redist_write(sgi + REG_IGROUPR, 4, gic.redist_read(sgi + REG_IGROUPR, 4) | 1 << intid)
    gic.redist_write(sgi + REG_IPRIORITYR + intid, 1, prio)
    gic.redist_write(sgi + REG_ISENABLER, 4, 1 << intid)


def test_identification_and_waker() -> None:
    gic = GicV3(2)
    assert gic.dist_read(0x4, 4) & 0x1F == 8                  # 288 INTIDs (as QEMU virt)
    assert gic.dist_read(0xFFE8, 4) >> 4 & 0xF == 3           # GICv3
    assert gic.dist_read(0, 4) & 0x50 == 0x50                 # ARE, DS read as one
    assert gic.redist_read(0x14, 4) == 0x6                    # asleep at reset
    gic.redist_write(0x14, 4, 0)
    assert gic.redist_read(0x14, 4) == 0
    typer0 = gic.redist_read(0x8, 8)
    typer1 = gic.redist_read(GICR_STRIDE + 0x8, 8)
    assert typer0 >> 32 == 0 and not typer0 & 0x10             # Aff0 0, not last
    assert typer1 >> 32 == 1 and typer1 & 0x10 and (typer1 >> 8) & 0xFFFF == 1
    assert gic.redist_read(GICR_STRIDE + 0xC, 4) == 1         # upper word: Aff0


def test_ppi_level_acknowledge_eoi_and_redelivery() -> None:
    gic, changed = make()
    enable_ppi(gic, 0, 27, 0x80)
    assert gic.signalled(0) is None
    gic.set_level(0, 27, True)
    assert changed == [0] and gic.signalled(0) == 27 and gic.signalled(1) is None
    assert gic.icc_read(0, "ICC_HPPIR1_EL1") == 27
    assert gic.icc_read(0, "ICC_IAR1_EL1") == 27
    assert gic.icc_read(0, "ICC_RPR_EL1") == 0x80
    assert gic.signalled(0) is None                           # active: not signalled again
    assert gic.icc_read(0, "ICC_IAR1_EL1") == SPURIOUS
    gic.icc_write(0, "ICC_EOIR1_EL1", 27)                     # line still high: pending again
    assert gic.icc_read(0, "ICC_RPR_EL1") == 0xFF and gic.signalled(0) == 27
    gic.set_level(0, 27, False)
    assert gic.signalled(0) is None


def test_priority_mask_preemption_and_eoimode() -> None:
    gic, _ = make()
    enable_ppi(gic, 0, 27, 0xA0)
    enable_ppi(gic, 0, 30, 0x40)
    gic.icc_write(0, "ICC_PMR_EL1", 0xA0)                     # 0xA0 is not below PMR
    gic.set_level(0, 27, True)
    assert gic.signalled(0) is None
    gic.icc_write(0, "ICC_PMR_EL1", 0xFF)
    assert gic.icc_read(0, "ICC_IAR1_EL1") == 27
    gic.set_level(0, 30, True)                                # higher priority pre-empts
    assert gic.icc_read(0, "ICC_IAR1_EL1") == 30
    assert gic.icc_read(0, "ICC_RPR_EL1") == 0x40
    gic.icc_write(0, "ICC_CTLR_EL1", 2)                       # EOImode 1: drop only
    gic.icc_write(0, "ICC_EOIR1_EL1", 30)
    assert gic.icc_read(0, "ICC_RPR_EL1") == 0xA0
    assert gic.redist_read(SGI_FRAME + 0x300, 4) >> 30 & 1    # still active
    gic.icc_write(0, "ICC_DIR_EL1", 30)
    assert not gic.redist_read(SGI_FRAME + 0x300, 4) >> 30 & 1


def test_spi_routing_edge_and_group0_not_signalled() -> None:
    gic, _ = make(3)
    gic.dist_write(REG_IGROUPR + 4, 4, 1 << 8)                # INTID 40 in group 1
    gic.dist_write(REG_IPRIORITYR + 40, 1, 0x10)
    gic.dist_write(REG_IROUTER + 8 * 40, 8, 2)                # to vCPU 2
    gic.dist_write(REG_ICFGR + 8, 4, 2 << 16)                 # INTID 40 edge
    gic.dist_write(REG_ISENABLER + 4, 4, 1 << 8 | 1 << 9)
    gic.set_level(0, 40, True)
    gic.set_level(0, 40, False)                               # edge: stays pending
    assert gic.signalled(2) == 40 and gic.signalled(0) is None
    assert gic.icc_read(2, "ICC_IAR1_EL1") == 40
    gic.icc_write(2, "ICC_EOIR1_EL1", 40)
    assert gic.signalled(2) is None
    gic.dist_write(REG_ISPENDR + 4, 4, 1 << 9)                # INTID 41: group 0 -> FIQ, never IRQ
    assert gic.signalled(0) is None and gic.dist_read(REG_ISPENDR + 4, 4) >> 9 & 1
    assert gic.dist_read(REG_ISENABLER, 4) == 0               # private INTIDs are not in GICD


def test_sgi_to_list_and_to_others() -> None:
    gic, _ = make(3)
    for cpu in range(3):
        enable_ppi(gic, cpu, 5, 0x20)
    gic.icc_write(0, "ICC_SGI1R_EL1", 5 << 24 | 0b100)       # to vCPU 2
    assert [gic.signalled(c) for c in range(3)] == [None, None, 5]
    gic.icc_write(2, "ICC_SGI1R_EL1", 5 << 24 | 1 << 40)     # to all but vCPU 2
    assert [gic.signalled(c) for c in range(3)] == [5, 5, 5]


def test_igrpen1_and_distributor_enable_gate_everything() -> None:
    gic, _ = make()
    enable_ppi(gic, 0, 27, 0x80)
    gic.set_level(0, 27, True)
    gic.icc_write(0, "ICC_IGRPEN1_EL1", 0)
    assert gic.signalled(0) is None
    gic.icc_write(0, "ICC_IGRPEN1_EL1", 1)
    gic.dist_write(0, 4, 0)
    assert gic.signalled(0) is None
    gic.dist_write(0, 4, 2)
    assert gic.signalled(0) == 27


def test_state_round_trip_and_validation() -> None:
    gic, _ = make()
    enable_ppi(gic, 1, 27, 0x80)
    gic.set_level(1, 27, True)
    assert gic.icc_read(1, "ICC_IAR1_EL1") == 27
    saved = gic.save()
    raw = saved.to_dict()
    other = GicV3(2)
    other.restore(GicState.from_dict(raw))
    assert other.save() == saved and other.icc_read(1, "ICC_RPR_EL1") == 0x80
    with pytest.raises(DeviceStateError):
        GicState.from_dict({**raw, "enable": 1})              # private bit in the distributor
    with pytest.raises(DeviceStateError):
        GicState.from_dict({**raw, "priority": [0] * 3})
    bad_cpu = dict(raw["cpus"][0], running=[5000])
    with pytest.raises(DeviceStateError):
        GicState.from_dict({**raw, "cpus": [bad_cpu, raw["cpus"][1]]})
    with pytest.raises(DeviceStateError):
        GicV3(3).restore(saved)
    with pytest.raises(ValueError):
        gic.set_level(0, 5, True)                             # SGIs have no input line


def test_virt_device_tree_describes_the_gic_and_timer() -> None:
    from hv import fdt as fdtlib
    from hv.boards.virt.fdt import build_virt_fdt
    from hv.memory import GuestMemory, RegionSpec

    mem = GuestMemory([RegionSpec(0x4000_0000, 16 << 20)])
    try:
        root = fdtlib.parse_fdt(build_virt_fdt(mem, "x", smp=2))
    finally:
        mem.close()
    intc = fdtlib.find_node(root, "/intc@8000000")
    assert intc.props["compatible"] == b"arm,gic-v3\0" and "interrupt-controller" in intc.props
    assert intc.props["reg"] == fdtlib.prop_u64(0x0800_0000, 0x10000, 0x080A_0000, 2 * GICR_STRIDE)
    assert root.props["interrupt-parent"] == intc.props["phandle"]
    timer = fdtlib.find_node(root, "/timer")
    assert timer.props["interrupts"][12:24] == fdtlib.prop_u32(1, 14, 4)   # non-secure physical: PPI 30
    assert timer.props["interrupts"][24:36] == fdtlib.prop_u32(1, 11, 4)   # virtual: PPI 27


def enable_spi(gic: GicV3, intid: int, prio: int, edge: bool = False) -> None:
    n, bit = divmod(intid, 32)
    gic.dist_write(REG_IGROUPR + 4 * n, 4, gic.dist_read(REG_IGROUPR + 4 * n, 4) | 1 << bit)
    gic.dist_write(REG_IPRIORITYR + intid, 1, prio)
    cfg_n, cfg_i = divmod(intid, 16)
    old = gic.dist_read(REG_ICFGR + 4 * cfg_n, 4)
    gic.dist_write(REG_ICFGR + 4 * cfg_n, 4, old | 2 << (2 * cfg_i) if edge else old & ~(2 << (2 * cfg_i)))
    gic.dist_write(REG_ISENABLER + 4 * n, 4, 1 << bit)


@pytest.mark.parametrize("edge", [False, True], ids=["icfgr-level", "icfgr-edge"])
def test_pulse_spi_latches_pending_until_acknowledged(edge: bool) -> None:
    """A message-signalled SPI (GICv2m) is an edge whatever ICFGR says: the latch is set,
    the input line is untouched, a second pulse before the acknowledge merges."""
    gic, changed = make()
    enable_spi(gic, 143, 0x40, edge)
    gic.pulse_spi(143)
    gic.pulse_spi(143)
    assert changed == [0] * 2 and gic.signalled(0) == 143 and not gic.s.line >> 143 & 1
    assert gic.dist_read(REG_ISPENDR + 4 * 4, 4) >> 15 & 1                 # ISPENDR4 bit 15
    assert gic.icc_read(0, "ICC_IAR1_EL1") == 143
    assert gic.icc_read(0, "ICC_IAR1_EL1") == SPURIOUS                      # merged: taken once
    gic.icc_write(0, "ICC_EOIR1_EL1", 143)
    assert gic.signalled(0) is None and not gic.s.pending >> 143 & 1
    gic.pulse_spi(143)                                                      # while active: pends again
    assert gic.icc_read(0, "ICC_IAR1_EL1") == 143


def test_pulse_spi_while_disabled_waits_and_targets_the_routed_vcpu() -> None:
    gic, changed = make(2)
    gic.dist_write(REG_IROUTER + 8 * 90, 8, 1)
    gic.pulse_spi(90)                                                       # not enabled yet
    assert gic.signalled(1) is None and changed == []
    enable_spi(gic, 90, 0x20)
    assert gic.signalled(1) == 90 and gic.signalled(0) is None
    for bad in (31, 5, 288):
        with pytest.raises(ValueError):
            gic.pulse_spi(bad)


def test_level_spi_follows_its_line_and_edge_spi_latches() -> None:
    gic, _ = make()
    enable_spi(gic, 38, 0x80)                                               # level (PCI INTx)
    enable_spi(gic, 200, 0x80, edge=True)
    gic.set_level(0, 38, True)
    assert gic.signalled(0) == 38
    gic.set_level(0, 38, False)                                             # level: not latched
    assert gic.signalled(0) is None
    gic.set_level(0, 200, True)
    gic.set_level(0, 200, False)                                            # edge: latched
    assert gic.signalled(0) == 200


def test_a_state_saved_with_96_intids_still_restores() -> None:
    gic, _ = make()
    enable_spi(gic, 40, 0x30)
    raw = gic.save().to_dict()
    raw["priority"], raw["router"] = raw["priority"][:96], raw["router"][:96]
    state = GicState.from_dict(raw)
    assert len(state.priority) == len(state.router) == 288 and state.priority[40] == 0x30
    with pytest.raises(DeviceStateError):
        GicState.from_dict({**raw, "priority": [0] * 97})
