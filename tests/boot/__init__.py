"""Booting: the kernel loaders (ELF/multiboot, bzImage/PVH, arm64 Image), the boards' layouts,
ACPI tables and device tree, and the Linux guest images the e2e tests boot."""
