"""One error root: every exception class hv and its back-ends define is an HvError.

The launcher catches :class:`hv.errors.HvError` once and prints one line; anything else is
a bug and shows its traceback. So an error class that is not an ``HvError`` would turn bad
input into a traceback. The few that are not, on purpose, are listed with the reason.
"""
from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

from hv import errors
from hv.errors import HvError
from tests.helpers import ROOT

PACKAGES = {"hv": ROOT / "hv", "hv_backends": ROOT / "backends"}

#: Exception classes that are deliberately not HvErrors, and why.
EXEMPT = {
    "hv.machine.runstate.IllegalTransition": "a run-state change the table forbids is a bug in hv",
    "hv.migration.status.IllegalTransition": "a migration-status change the table forbids is a bug in hv",
    "hv.values.ValueFormatError": "hv.values is a leaf (imports nothing from hv); callers re-raise "
                                  "it as their layer's HvError",
    "hv_backends.native.unicorn.build_unicorn.BuildError": "raised by the install-time Unicorn build "
                                                           "(setup.py), which runs before hv is importable",
    "hv_backends.unicorn_x86_delivery.DeliveryFault": "a guest fault met while delivering an "
                                                      "exception; caught by unicorn_x86, never leaves it",
}


def module_names() -> list[str]:
    names = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join([package, *parts]))
    return names


def defined_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined (not imported) by a module of hv/ or backends/."""
    found: dict[str, type[BaseException]] = {}
    importlib.import_module("hv.cli")   # the launcher's import order first, as hv runs
    for name in module_names():
        module = importlib.import_module(name)
        for _attr, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == name:
                found[f"{name}.{value.__qualname__}"] = value
    return found


def test_every_exception_class_is_an_hv_error():
    found = defined_exceptions()
    assert len(found) > 30, sorted(found)   # the walk really saw hv's modules
    strays = sorted(name for name, cls in found.items() if not issubclass(cls, HvError) and name not in EXEMPT)
    assert not strays, f"exception classes that are not hv.errors.HvError (derive from a layer base): {strays}"


def test_exempt_list_is_current():
    """An exemption for a class that no longer exists, or that became an HvError, goes."""
    found = defined_exceptions()
    for name in EXEMPT:
        assert name in found, f"{name} is exempt but not defined any more"
        assert not issubclass(found[name], HvError), f"{name} is an HvError now: drop its exemption"


@pytest.mark.parametrize("name", errors.__all__)
def test_layer_bases_are_hv_errors(name):
    assert issubclass(getattr(errors, name), HvError)


def test_second_bases_callers_rely_on():
    """Classes that callers catch as ValueError/OSError/RuntimeError keep that base."""
    from hv.block import BlockError
    from hv.config import ConfigError
    from hv.devices.interfaces import DeviceStateError
    from hv.devices.pci import PciError
    from hv.machine import MachineError
    from hv.migration.stream import StreamError
    from hv.migration.transport import MigrationUriError
    from hv.net import NetError
    from hv.qmp.server import QmpServerError
    from hv_backends.base import BackendError

    for cls in (ConfigError, DeviceStateError, PciError, MigrationUriError):
        assert issubclass(cls, ValueError), cls
    for cls in (BlockError, NetError, QmpServerError):
        assert issubclass(cls, OSError), cls
    for cls in (MachineError, BackendError):
        assert issubclass(cls, RuntimeError), cls
    assert issubclass(StreamError, errors.MigrationError)
    assert BlockError(2, "No such file or directory").strerror == "No such file or directory"


def test_moved_classes_are_the_same_objects():
    """Classes moved into hv.errors are still importable where tests and callers find them."""
    from hv.config import ConfigError
    from hv.devices.interfaces import DeviceStateError
    from hv.machine import MachineError
    from hv.migration.engine import MigrationError
    from hv.migration.stream import StreamError

    assert (ConfigError, DeviceStateError, MachineError, MigrationError, StreamError) == \
        (errors.ConfigError, errors.DeviceStateError, errors.MachineError, errors.MigrationError,
         errors.StreamError)


def test_hv_errors_imports_nothing():
    """hv.errors must stay importable from any layer (hv_backends too) without a cycle."""
    tree = (ROOT / "hv" / "errors.py").read_text()
    imports = [line for line in tree.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["from __future__ import annotations"]


def run_main(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_cli_prints_an_hv_error_as_one_line():
    """An HvError raised anywhere under main() is one 'hv: error:' line and exit 1."""
    out = run_main("import sys, hv.cli\n"
                   "from hv.errors import DeviceError\n"
                   "def boom(config): raise DeviceError('disk d0: on fire')\n"
                   "hv.cli.run = boom\n"
                   "sys.exit(hv.cli.main(['-machine', 'q35', '-incoming', 'defer']))")
    assert out.returncode == 1, out
    assert out.stderr.splitlines()[-1] == "hv: error: disk d0: on fire"
    assert "Traceback" not in out.stderr


def test_cli_shows_a_programming_error_with_its_traceback():
    """A bug (here a TypeError) is not bad input: main does not turn it into one line."""
    out = run_main("import sys, hv.cli\n"
                   "def boom(config): return len(3)\n"
                   "hv.cli.run = boom\n"
                   "sys.exit(hv.cli.main(['-machine', 'q35', '-incoming', 'defer']))")
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "TypeError" in out.stderr
    assert "hv: error:" not in out.stderr
