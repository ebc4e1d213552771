"""Build hv's libunicorn: Unicorn 2.1.4 from its PyPI sdist with hv's store fast-path patch.

Why: Unicorn 2.1.4 gives every writable RAM page TLB_NOTDIRTY, so every guest store takes
the softmmu slow path (~7x slower than loads). ``hv-store-fast-path.patch`` keeps that flag
only on pages that hold translated code (see README.md here). No PyPI release carries an
equivalent change, so ``pip install`` builds the library (setup.py calls :func:`ensure_library`
from build_ext) and hv loads it instead of the wheel's (``hv_backends/__init__.py``).

Steps: fetch the sdist with pip (its sha256 is pinned), apply the patch (strictly: every hunk
must match), configure with cmake for the x86 and aarch64 targets only, build the shared
library, copy ``libunicorn.so.2`` to the output directory and write ``build-status.json``
beside it. A finished library is cached (``$HV_UNICORN_CACHE``, default
``~/.cache/hv/unicorn``) under a key of the sdist hash, the patch and the build flags, so a
reinstall costs nothing. ``HV_UNICORN_BUILD=0`` skips the build (hv then uses the wheel's
library). Every failure is reported, never raised: the install must succeed regardless.

Run by hand: ``python backends/native/unicorn/build_unicorn.py --out DIR``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

log = logging.getLogger("hv.build_unicorn")

HERE = Path(__file__).resolve().parent
PATCH = HERE / "hv-store-fast-path.patch"
VERSION = "2.1.4"
SDIST_NAME = f"unicorn-{VERSION}.tar.gz"
SDIST_SHA256 = "00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff"
LIB_NAME = "libunicorn.so.2"
STATUS_NAME = "build-status.json"
ARCHS = "x86;aarch64"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", f"-DUNICORN_ARCH={ARCHS}", "-DUNICORN_BUILD_TESTS=OFF",
               "-DUNICORN_LEGACY_STATIC_ARCHIVE=OFF", "-DUNICORN_INSTALL=OFF", "-DBUILD_SHARED_LIBS=ON"]
STEP_TIMEOUT = 1800   # seconds for one download/configure/build step


class BuildError(Exception):
    """One step of the build failed; the message says which and why."""


@dataclasses.dataclass
class BuildStatus:
    """What ``build-status.json`` records for hv's library selection and the tests."""

    built: bool
    reason: str
    version: str = VERSION
    patch_sha256: str = ""
    seconds: float = 0.0

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / STATUS_NAME).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")


def cache_root() -> Path:
    env = os.environ.get("HV_UNICORN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hv" / "unicorn"


def build_key() -> str:
    """Names a finished library: changes whenever the inputs of the build change."""
    digest = hashlib.sha256(SDIST_SHA256.encode())
    digest.update(PATCH.read_bytes())
    digest.update(" ".join(CMAKE_FLAGS).encode())
    return digest.hexdigest()[:20]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{what}: {exc}") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise BuildError(f"{what} failed (exit {proc.returncode}): {tail}")


def _pip_download(dest: Path) -> None:
    """``pip download`` of the sdist, honouring the user's pip configuration (index,
    proxy). Inside pip's isolated build environment pip itself is hidden by PYTHONPATH
    and PYTHONNOUSERSITE, so the child runs without them: it sees the interpreter's own
    site-packages, where the pip running this install lives."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    args = ["download", "--quiet", "--no-binary", ":all:", "--no-deps", "-d", str(dest), f"unicorn=={VERSION}"]
    failures = []
    for pip in ([sys.executable, "-m", "pip"], [shutil.which("pip3") or "pip3"]):
        try:
            _run([*pip, *args], "pip download of the unicorn sdist", env=env)
            return
        except BuildError as exc:
            failures.append(str(exc))
    raise BuildError("; ".join(failures))


def fetch_sdist(cache: Path) -> Path:
    """The verified sdist: from the cache, else downloaded with pip into it."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / SDIST_NAME
    if target.is_file() and _sha256(target) == SDIST_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _pip_download(Path(tmp))
        got = Path(tmp) / SDIST_NAME
        if not got.is_file():
            raise BuildError(f"pip download did not produce {SDIST_NAME}")
        actual = _sha256(got)
        if actual != SDIST_SHA256:
            raise BuildError(f"{SDIST_NAME} has sha256 {actual}, expected {SDIST_SHA256}")
        os.replace(got, target)
    return target


def _parse_patch(text: str) -> dict[str, list[tuple[int, list[str], list[str]]]]:
    """file -> hunks (old start line, old lines, new lines) of a unified diff."""
    files: dict[str, list[tuple[int, list[str], list[str]]]] = {}
    lines = text.splitlines(keepends=True)
    i, current = 0, None
    while i < len(lines):
        line = lines[i]
        if line.startswith("+++ "):
            name = line[4:].strip().split("/", 1)[1]
            current = files.setdefault(name, [])
        elif line.startswith("@@ "):
            match = re.match(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", line)
            if match is None or current is None:
                raise BuildError(f"malformed patch line {i + 1}")
            old_n = int(match.group(2) or 1)
            new_n = int(match.group(4) or 1)
            old: list[str] = []
            new: list[str] = []
            i += 1
            while len(old) < old_n or len(new) < new_n:
                body = lines[i]
                if body.startswith((" ", "-")):
                    old.append(body[1:])
                if body.startswith((" ", "+")):
                    new.append(body[1:])
                i += 1
            current.append((int(match.group(1)), old, new))
            continue
        i += 1
    return files


def apply_patch(src: Path, patch: Path) -> None:
    """Apply ``patch`` to the tree ``src``; every hunk must match exactly where it says."""
    for name, hunks in _parse_patch(patch.read_text()).items():
        path = src / name
        lines = path.read_text().splitlines(keepends=True)
        shift = 0
        for start, old, new in hunks:
            at = start - 1 + shift if old else start + shift
            if lines[at:at + len(old)] != old:
                raise BuildError(f"patch does not apply to {name} at line {start}")
            lines[at:at + len(old)] = new
            shift += len(new) - len(old)
        path.write_text("".join(lines))


def _cmake() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    try:
        import cmake  # noqa: PLC0415 - the PyPI cmake package, a build requirement in pyproject.toml
    except ImportError:
        raise BuildError("cmake not found (apt-get install cmake, or pip install cmake)") from None
    return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")


def compile_library(sdist: Path, work: Path) -> Path:
    """Extract, patch and build; returns the built shared library."""
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    src = work / f"unicorn-{VERSION}" / "src"
    apply_patch(src, PATCH)
    build = work / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    cmake = _cmake()
    _run([cmake, "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS], "cmake configure")
    jobs = str(max(1, os.cpu_count() or 1))
    _run([cmake, "--build", str(build), "--target", "unicorn", "-j", jobs], "cmake build of libunicorn")
    built = build / LIB_NAME
    if not built.is_file():
        raise BuildError(f"the build did not produce {LIB_NAME}")
    return built


def cached_library() -> Path:
    """Build (or find in the cache) the patched library; raises BuildError."""
    root = cache_root()
    entry = root / build_key() / LIB_NAME
    if entry.is_file():
        return entry
    sdist = fetch_sdist(root)
    with tempfile.TemporaryDirectory(prefix="hv-unicorn-") as tmp:
        built = compile_library(sdist, Path(tmp))
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_suffix(".partial")
        shutil.copy2(built, partial)
        os.replace(partial, entry)
    return entry


def ensure_library(out_dir: Path) -> BuildStatus:
    """Put the patched ``libunicorn.so.2`` and ``build-status.json`` in ``out_dir``. Never
    raises: a failure leaves a status that says why (hv then uses the wheel's library)."""
    started = time.monotonic()
    patch_sha = _sha256(PATCH)
    if os.environ.get("HV_UNICORN_BUILD", "1") == "0":
        (out_dir / LIB_NAME).unlink(missing_ok=True)
        status = BuildStatus(False, "not built: HV_UNICORN_BUILD=0 at install", patch_sha256=patch_sha)
    else:
        try:
            library = cached_library()
            out_dir.mkdir(parents=True, exist_ok=True)
            # a new file renamed over the old one: an hv already running keeps the library it
            # mapped, and one starting meanwhile finds the old or the new one, never a gap
            partial = out_dir / f".{LIB_NAME}.{os.getpid()}"
            shutil.copy2(library, partial)
            os.replace(partial, out_dir / LIB_NAME)
            status = BuildStatus(True, "built from the unicorn 2.1.4 sdist with hv-store-fast-path.patch",
                                 patch_sha256=patch_sha)
        except (BuildError, OSError, tarfile.TarError) as exc:
            for stale in (out_dir / LIB_NAME, out_dir / f".{LIB_NAME}.{os.getpid()}"):
                stale.unlink(missing_ok=True)
            status = BuildStatus(False, f"build failed: {exc}", patch_sha256=patch_sha)
    status.seconds = round(time.monotonic() - started, 1)
    status.write(out_dir)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description="Build hv's patched libunicorn.")
    parser.add_argument("--out", type=Path, default=HERE / "lib", help="output directory")
    args = parser.parse_args()
    status = ensure_library(args.out)
    print(f"{'ok' if status.built else 'NOT BUILT'}: {status.reason} ({status.seconds} s)")
    return 0 if status.built else 1


if __name__ == "__main__":
    sys.exit(main())
