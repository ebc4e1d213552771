"""Which libunicorn hv runs on: its patched build (backends/native/unicorn) when the install
built it, else the unicorn wheel's; the choice is logged (debug level when it is the expected
one, a warning when the build failed) and ``library_description()`` says which.

The build itself is exercised by the README's install (setup.py); these tests read what it
left (``build-status.json``), run real guests, and check the selection's refusals and the
strict patch application on real files.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hv_backends
from hv_backends.native.unicorn import build_unicorn
from tests.helpers import ROOT

HELLO = ROOT / "fixtures" / "x86_64" / "hello.elf"
STATUS = hv_backends.PATCHED_UNICORN_DIR / "build-status.json"


def _loaded_library(**env: str) -> str:
    """What a fresh process loads, as hv says it (the library is chosen at import time)."""
    code = ("import hv_backends.unicorn_common as u; u.uclib(); print(u.library_description())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **env}, check=True)
    return result.stdout.strip()


def _status() -> dict:
    if not STATUS.is_file():
        pytest.skip(f"hv was installed without running its build_ext ({STATUS} is missing)")
    return json.loads(STATUS.read_text())


def test_hv_runs_on_the_patched_library_when_it_was_built(hv):
    status = _status()
    if not status["built"]:
        pytest.skip(f"the install did not build hv's libunicorn: {status['reason']}")
    assert hv_backends.UNICORN_LIBRARY.patched, hv_backends.UNICORN_LIBRARY
    vm = hv("-machine", "q35", "-accel", "unicorn", "-kernel", str(HELLO), "-append", "lib")
    assert vm.wait(120) == 0
    assert "cmdline: lib" in vm.output()
    assert _loaded_library().startswith("hv's patched libunicorn 2.1.4 (store fast path)")


def test_stock_library_on_request(hv, monkeypatch):
    monkeypatch.setenv("HV_UNICORN_STOCK", "1")
    vm = hv("-machine", "q35", "-accel", "unicorn", "-kernel", str(HELLO), "-append", "stock")
    assert vm.wait(120) == 0
    assert "cmdline: stock" in vm.output()
    described = _loaded_library(HV_UNICORN_STOCK="1")
    assert described.startswith("the unicorn wheel's libunicorn") and "(HV_UNICORN_STOCK=1)" in described


def test_a_foreign_library_is_refused(tmp_path):
    """A libunicorn.so.2 without hv's marker (here: the wheel's own) is not used."""
    import unicorn

    wheel_lib = Path(unicorn.__file__).parent / "lib" / "libunicorn.so.2"
    if not wheel_lib.is_file():
        pytest.skip(f"the unicorn wheel has no {wheel_lib.name} to copy")
    shutil.copy(wheel_lib, tmp_path / "libunicorn.so.2")
    assert "not hv's patched build" in hv_backends._check_patched(tmp_path)
    assert "cannot load" in hv_backends._check_patched(tmp_path / "missing")


def test_patch_applies_only_to_the_tree_it_was_made_for(tmp_path):
    """Every hunk must match: a changed source line makes the build stop, not guess."""
    hunks = build_unicorn._parse_patch(build_unicorn.PATCH.read_text())
    assert "qemu/accel/tcg/cputlb.c" in hunks and "uc.c" in hunks
    name = "qemu/accel/tcg/translate-all.h"
    (start, old, _new), = hunks[name]
    target = tmp_path / name
    target.parent.mkdir(parents=True)
    lines = ["// filler\n"] * (start - 1) + old
    target.write_text("".join(lines))
    single = tmp_path / "one.patch"
    text = build_unicorn.PATCH.read_text()
    section = text[text.index(f"--- a/{name}"):]
    section = section[:section.find("\ndiff ", 1) + 1 or len(section)]
    single.write_text(section)
    build_unicorn.apply_patch(tmp_path, single)
    assert "tb_page_has_code" in target.read_text()
    target.write_text("".join(lines).replace(old[0], "changed upstream\n", 1))
    with pytest.raises(build_unicorn.BuildError, match="does not apply"):
        build_unicorn.apply_patch(tmp_path, single)


def test_skipped_build_leaves_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HV_UNICORN_BUILD", "0")
    status = build_unicorn.ensure_library(tmp_path)
    assert not status.built and "HV_UNICORN_BUILD=0" in status.reason
    recorded = json.loads((tmp_path / "build-status.json").read_text())
    assert recorded["built"] is False and recorded["version"] == "2.1.4"
    assert not (tmp_path / "libunicorn.so.2").exists()
