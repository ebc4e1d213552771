"""Where tests find the Linux guest images (fixtures/linux/build_images.py).

``linux_images(arch)`` returns the paths of ``arch``'s images, building them on first use
into ``${HV_IMAGE_CACHE:-~/.cache/hv/images}`` under a file lock, so parallel xdist workers
build once and later sessions reuse the cache. When they cannot be built here (no route to
deb.debian.org, e2fsprogs or gcc missing) the calling test skips, and the reason names the
command that builds them. A download that does not match its signed hash is a failure,
not a skip. ``linux_images_fixture`` is the same as a pytest fixture factory.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hv_fixtures.linux import assemble, build_images, debarchive

BUILD_COMMAND = "python fixtures/linux/build_images.py"


@dataclasses.dataclass(frozen=True)
class LinuxImages:
    """One arch's images; ``vmlinux`` (the PVH ELF) exists for x86_64 only."""
    arch: str
    directory: Path
    vmlinuz: Path
    vmlinux: Path | None
    initramfs: Path
    rootfs: Path
    manifest: dict[str, Any]


_built: dict[tuple[str, Path], LinuxImages] = {}


def linux_images(arch: str, cache: Path | None = None) -> LinuxImages:
    """``arch``'s images (x86_64 or aarch64), built first if the cache lacks them or they
    are stale; skips the calling test when they cannot be built on this machine."""
    if arch not in build_images.ARCHES:
        raise ValueError(f"no Linux images for arch {arch!r}")
    cache = (cache or build_images.default_cache()).expanduser().resolve()
    key = (arch, cache)
    if key not in _built:
        try:
            manifest = build_images.ensure_arch(arch, cache)
        except (debarchive.Unavailable, assemble.ToolMissing) as err:
            pytest.skip(f"Linux images for {arch} cannot be built here ({err}); "
                        f"build them with: {BUILD_COMMAND} --arch {arch}")
        directory = cache / arch
        _built[key] = LinuxImages(arch, directory, directory / "vmlinuz",
                                  directory / "vmlinux" if arch == "x86_64" else None,
                                  directory / "initramfs.cpio.gz", directory / "rootfs.ext4", manifest)
    return _built[key]


@pytest.fixture(scope="session")
def linux_images_fixture() -> Callable[[str], LinuxImages]:
    """A fixture form: ``def test_x(linux_images_fixture): linux_images_fixture("aarch64")``."""
    return linux_images
