"""Machines as guests and users see them: the launcher's command line, virtio-blk and PCIe
on the real buses, hot-plug, interrupts and timers, SMP, the fixture guests on every backend."""
