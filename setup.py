"""Builds the native parts of ``hv_backends`` during ``pip install``:

* the cffi extension ``hv_backends._hv_native`` (the Unicorn backend's hot hooks);
* hv's patched libunicorn (Unicorn 2.1.4 + ``backends/native/unicorn/hv-store-fast-path.patch``,
  x86 and aarch64 targets) into ``hv_backends/native/unicorn/lib/``. A failed build never
  fails the install: hv then uses the unicorn wheel's library and logs why.

All other metadata lives in pyproject.toml.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


class BuildExtWithUnicorn(build_ext):
    """build_ext, then the patched libunicorn beside the extension (in place for editable
    installs, in build_lib for wheels)."""

    def run(self) -> None:
        super().run()
        package_dir = Path(self.get_ext_fullpath("hv_backends._hv_native")).parent
        try:
            spec = importlib.util.spec_from_file_location(
                "hv_build_unicorn", HERE / "backends" / "native" / "unicorn" / "build_unicorn.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module   # dataclasses look their module up there
            spec.loader.exec_module(module)
            status = module.ensure_library(package_dir / "native" / "unicorn" / "lib")
            built, reason, seconds = status.built, status.reason, status.seconds
        except Exception as exc:  # noqa: BLE001 - a failed library build must never fail the install
            built, reason, seconds = False, f"build script failed: {exc!r}", 0.0
        if built:
            print(f"hv: patched libunicorn ready ({seconds} s)")
        else:
            print(f"WARNING: hv: {reason}; hv will use the unicorn wheel's library "
                  "(guest stores run several times slower)", file=sys.stderr)


setup(cffi_modules=["backends/native/build_native.py:ffibuilder"],
      cmdclass={"build_ext": BuildExtWithUnicorn})
