"""The virt board (aarch64): its memory map (:mod:`.layout`), device tree and boot firmware."""
