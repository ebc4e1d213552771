"""``hv bench emulator``'s second figure (bare Unicorn) is printed for hv's own command: it
compared the command with ``python -m`` while hv bench starts ``python -P -m hv``, so the
figure was always skipped as if another hv had been chosen."""
from __future__ import annotations

from pathlib import Path

import pytest

from hv.bench.common import HV_COMMAND
from hv.bench.emulator import EmuCase, EmuRow, EmuSample, EmuSettings, bare_lines, bare_unicorn
from hv_backends import UNICORN_LIBRARY


def test_bare_figure_is_measured_for_hvs_own_command() -> None:
    settings = EmuSettings(mib=1, passes=1, timeout=60, qemu={})
    assert settings.hv == HV_COMMAND
    rows = [EmuRow(EmuCase("x86_64", "hv", "unicorn"), [EmuSample(1.0, 0.5, ("pass 1 sum 0 bad 0",))])]
    lines = bare_lines(rows, settings, 1)
    assert len(lines) == 1 and lines[0].startswith("bare Unicorn x86_64 ("), lines
    assert " M stores/s; hv unicorn guest: " in lines[0]


def test_bare_figure_is_skipped_for_another_hv_command() -> None:
    settings = EmuSettings(mib=1, passes=1, timeout=60, qemu={}, hv=("/bin/false",))
    rows = [EmuRow(EmuCase("x86_64", "hv", "unicorn"), [EmuSample(1.0, 0.5, ("pass 1 sum 0 bad 0",))])]
    assert bare_lines(rows, settings, 1) == [
        "bare Unicorn: skipped (--hv runs another hv command; the bare loop uses this Python)"]


def test_bare_loop_ignores_a_stray_package_in_the_current_directory(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """hv bench run from a directory holding some other hv_backends/ (a build directory):
    the bare loop's child imports the installed one, as hv itself does (python -P)."""
    (tmp_path / "hv_backends").mkdir()
    (tmp_path / "hv_backends" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    stores, library = bare_unicorn(EmuSettings(mib=1, passes=1, timeout=60, qemu={}), 1)
    assert stores > 0 and library == UNICORN_LIBRARY.describe()
