"""ACPI tables for hv's x86 board: a pure function of board facts (no machine imports).

``build_q35_acpi(q35_board_facts(vcpus), base=0xE0000)`` returns an :class:`AcpiBlob`
whose ``data`` goes into guest RAM at ``base`` and whose ``rsdp_addr`` the loaders pass
to the kernel. See :mod:`hv.acpi.tables` for the layout and :mod:`hv.acpi.aml` for the
AML encoder the DSDT is written with.
"""
from hv.acpi.facts import AcpiError, BoardFacts, ResetRegister, q35_board_facts, q35_intx_gsi
from hv.acpi.tables import AcpiBlob, build_q35_acpi

__all__ = ["AcpiBlob", "AcpiError", "BoardFacts", "ResetRegister", "build_q35_acpi", "q35_board_facts",
           "q35_intx_gsi"]
