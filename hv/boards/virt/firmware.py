"""What the virt board's firmware leaves in guest RAM before the kernel's first instruction:
the kernel (:mod:`hv.boot`) and the board's device tree (:mod:`hv.boards.virt.fdt`), whose
address the kernel gets in x0, as U-Boot or QEMU's boot stub would."""
from __future__ import annotations

from hv.boards.virt.fdt import build_virt_fdt
from hv.boot import BootInfo, load_kernel
from hv.config import VmConfig
from hv.memory import GuestMemory


def setup_boot(memory: GuestMemory, config: VmConfig, image: bytes, initrd: bytes | None = None) -> BootInfo:
    """Load ``image`` (and ``initrd``) for ``config.smp`` vCPUs with ``config``'s command line
    and the device tree describing them. Returns the boot vCPU's state in
    ``BootInfo.cpu_state``; raises :class:`~hv.boot.LoaderError` (nothing written) on a bad image."""
    def build_dtb(initrd_range: tuple[int, int] | None) -> bytes:
        return build_virt_fdt(memory, config.append, config.smp, initrd_range)

    return load_kernel("aarch64", memory, image, config.append, smp=config.smp, initrd=initrd,
                       build_dtb=build_dtb)
