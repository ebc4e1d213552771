"""Devices as pure register files: no bus, no address, state as plain values.

Each device reads and writes registers by offset, reports interrupts and output through
small injected interfaces, and has a sibling state dataclass with ``save()`` /
``restore()`` for snapshots and migration.
"""
