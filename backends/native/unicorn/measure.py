"""Measure bare Unicorn's store and load speed with the stock and the patched libunicorn.

Not a test (its numbers depend on the machine): ``python backends/native/unicorn/measure.py
[--lib DIR]``. Each library runs in its own process (the binding picks its library at
import time through ``LIBUNICORN_PATH``). The loop is the one in BACKEND-NOTES: a flat
x86_64 loop without hooks writes (or reads) 32 MiB of RAM 8 times.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BASE, CODE, MIB = 0x100000, 0x1000, 32
# rdi = BASE, rsi = passes; loop: rcx = 0..n-1: mov [rdi+rcx*8], rax (or mov rbx, [...])
STORE = bytes.fromhex("48c7c6 08000000".replace(" ", "")) + bytes.fromhex(
    "4831c9" "48890ccf" "48ffc1" "4881f9" + (MIB * 1024 * 1024 // 8).to_bytes(4, "little").hex()
    + "75f0" "48ffce" "75e8" "f4")
LOAD = STORE.replace(bytes.fromhex("48890ccf"), bytes.fromhex("488b1ccf"))

CHILD = r"""
import json, sys, time, unicorn
from unicorn import x86_const as X
code, base, mib = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
uc.mem_map(0x1000, 0x1000)
uc.mem_map(base, mib << 20)
uc.mem_write(0x1000, code)
uc.reg_write(X.UC_X86_REG_RDI, base)
t = time.perf_counter()
uc.emu_start(0x1000, 0x1000 + len(code) - 1)
dt = time.perf_counter() - t
lib = unicorn.unicorn_py3.unicorn.uclib
patched = hasattr(lib, "hv_unicorn_patch_level")
print(json.dumps({"ops_per_s": 8 * (mib << 20) // 8 / dt, "patched": patched}))
"""


def run(code: bytes, lib: str | None) -> dict:
    env = dict(os.environ)
    env.pop("LIBUNICORN_PATH", None)
    if lib:
        env["LIBUNICORN_PATH"] = lib
    out = subprocess.run([sys.executable, "-c", CHILD, code.hex(), str(BASE), str(MIB)],
                         env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    default = Path(__file__).resolve().parent / "lib"
    parser.add_argument("--lib", default=str(default), help="directory of the patched libunicorn.so.2")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for name, lib in (("stock", None), ("patched", args.lib)):
        for kind, code in (("stores", STORE), ("loads", LOAD)):
            rates = sorted(run(code, lib)["ops_per_s"] for _ in range(args.repeat))
            print(f"{name:8} {kind:7} median {rates[len(rates) // 2] / 1e6:7.1f} M/s  (runs: "
                  + ", ".join(f"{r / 1e6:.1f}" for r in rates) + ")")


if __name__ == "__main__":
    main()
