"""hv talks to a CPU backend only through :mod:`hv_backends.base`.

Anchor: Cloud Hypervisor's ``hypervisor/src/cpu.rs`` -- one ``Vcpu`` trait and one
``VmExit`` enum say everything the VMM may ask of a hypervisor. Here
:class:`hv_backends.base.Vcpu` / :class:`~hv_backends.base.Vm` / ``ExitReason`` play that
part, and this test keeps it true: no module of ``hv/`` probes a vCPU, VM or backend with
``hasattr`` / ``getattr`` (a capability it needs belongs in the base class, with a default
that raises where only some backends have it), and none reads a leading-underscore
attribute of one (a backend's private engine handle, constants module, ...).

"Named like a vCPU / VM / backend": the probed object is a variable, attribute or
subscripted container whose name is ``vcpu``/``vcpus``/``vm``/``backend`` or ends in
``_vcpu``, ``_vm``, ``_backend`` (``vcpu``, ``self.vm``, ``machine.vcpus[0]``,
``target_vcpu``). Every module of ``hv/`` is checked, device back-ends (block, net)
included: probing those is the same smell.
"""
from __future__ import annotations

import ast
import re

import pytest

from hv_backends.base import BackendError, Vcpu
from tests.helpers import ROOT

CHECKED = ROOT / "hv"
SUBJECT = re.compile(r"(^|_)(vcpus?|vms?|backends?)$", re.IGNORECASE)
PROBES = {"hasattr", "getattr", "setattr", "delattr"}


def _subject(node: ast.expr) -> str | None:
    """The name an expression is known by: ``x`` -> x, ``a.b`` -> b, ``a.b[i]`` -> b."""
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Every seam violation in ``source``, as ``file:line: what``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PROBES \
                and node.args:
            name = _subject(node.args[0])
            if name is not None and SUBJECT.search(name):
                found.append(f"{filename}:{node.lineno}: {node.func.id}() on {name!r}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            name = _subject(node.value)
            if name is not None and SUBJECT.search(name):
                found.append(f"{filename}:{node.lineno}: private attribute {name}.{node.attr}")
    return sorted(found, key=lambda line: int(line.split(":", 2)[1]))


def test_hv_uses_only_the_backend_interface() -> None:
    found: list[str] = []
    for path in sorted(CHECKED.rglob("*.py")):
        found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "hv reaches past hv_backends.base:\n" + "\n".join(found)


@pytest.mark.parametrize("code", [
    "hasattr(vcpu, 'request_interrupt_window')",
    "getattr(vcpu, 'uc', None)",
    "getattr(self.vm, 'native')",
    "hasattr(machine.vcpus[0], 'x')",
    "x = target_vcpu._x",
    "self.vm._vm_fd",
    "backend._probe_fd(3)",
])
def test_checker_flags_probes_and_private_access(code: str) -> None:
    assert len(violations(code)) == 1


@pytest.mark.parametrize("code", [
    "getattr(self._local, 'index', None)",
    "vcpu.inject_interrupt(32)",
    "self._vcpus = []",
    "vcpu.__class__",
    "getattr(engine, name)",
])
def test_checker_leaves_the_rest_alone(code: str) -> None:
    assert violations(code) == []


def test_capabilities_only_some_backends_have_raise_by_name() -> None:
    """The base class's defaults for optional capabilities fail loudly, naming the
    backend, instead of the caller having to probe."""

    class Bare(Vcpu):
        backend_name = "bare"

        def run(self, io):  # type: ignore[no-untyped-def]
            raise AssertionError

        kick = get_state = set_state = run  # type: ignore[assignment]
        interrupts_enabled = request_interrupt_window = cancel_interrupt_window = run  # type: ignore[assignment]
        ready_for_interrupt = property(run)  # type: ignore[assignment]

    vcpu = Bare()
    for call in (lambda: vcpu.inject_interrupt(32), vcpu.inject_irq, lambda: vcpu.set_sysreg_handler(None),
                 lambda: vcpu.set_power_handler(None)):
        with pytest.raises(BackendError, match="not supported by bare"):
            call()
