"""The one root of hv's errors, and a base per layer.

Every error hv raises on purpose - bad input on the command line, in a kernel image, a
migration stream, a QMP command, or a host resource that cannot be had - is an
:class:`HvError`. The launcher catches :class:`HvError` once and prints its message as one
line (``hv: error: ...``); anything else (AttributeError, TypeError, KeyError...) is a
programming error and keeps its traceback.

Each layer has a base so callers can catch "anything the loader refuses" without listing
classes. Where callers relied on a built-in base (``except ValueError`` around parsing,
``except OSError`` around host I/O, ``except RuntimeError``), the concrete class keeps it as
a second base, so no existing ``except`` changes what it catches.

The back-ends' base is :class:`hv_backends.base.BackendError` (an ``HvError`` and a
``RuntimeError``). This module imports nothing: every module of hv and hv_backends can import it.
"""
from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeviceError",
    "DeviceStateError",
    "FirmwareError",
    "HvError",
    "LoaderError",
    "MachineError",
    "MigrationError",
    "MonitorError",
    "StreamError",
]


class HvError(Exception):
    """Root of every error hv raises on purpose; its message is one line a user can act on."""


class ConfigError(HvError, ValueError):
    """The command line (or a device description from QMP) is wrong; the message says which
    option and why."""


class LoaderError(HvError, ValueError):
    """A kernel, initrd or boot-data image cannot be loaded as given."""


class FirmwareError(HvError, ValueError):
    """Firmware tables (ACPI, AML, device tree) cannot be built from what was asked."""


class DeviceError(HvError):
    """A device (or its host back-end: disk image, network socket) refuses what it was asked."""


class DeviceStateError(DeviceError, ValueError):
    """A saved device state is malformed, of an unsupported version, or does not fit the
    device it is restored into."""


class MachineError(HvError, RuntimeError):
    """The machine cannot do what was asked in its current state or configuration."""


class MigrationError(HvError):
    """A migration (live or to/from a snapshot) failed; the message says why."""


class StreamError(MigrationError):
    """The migration stream is malformed, truncated, or does not fit this VM."""


class MonitorError(HvError):
    """The QMP monitor: a command failed, a client broke the protocol, or a socket cannot
    be served."""

