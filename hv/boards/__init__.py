"""Boards: one package per machine type (``q35`` for x86_64, ``virt`` for aarch64).

Each board package has a ``layout`` module - the board's whole guest-physical and port
map as plain constants plus a few pure functions (Firecracker's ``arch/*/layout.rs``
style) - and a ``firmware`` module that prepares guest RAM for boot (what a BIOS or
U-Boot would leave behind: ACPI tables or a device tree, then the kernel). Nothing else
in hv defines a board address: devices take their base as a constructor parameter and
everything else imports it from the layout.
"""
