"""The Linux guest images (fixtures/linux): the cpio writer, the kernel-file parsers, the
workload, and the built images themselves (skipped, naming the build command, where they
cannot be built)."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hv_fixtures.linux import assemble, build_images, debarchive, kernelimage, newc
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import tool_marks
from tests.linux_images import BUILD_COMMAND, LinuxImages, linux_images

ARCHES = ("x86_64", "aarch64")


# -- newc cpio ----------------------------------------------------------------------------

def sample_entries() -> list[newc.Entry]:
    return [newc.directory("bin"), newc.regular("bin/a", b"hello\n", 0o755),
            newc.symlink("bin/sh", "/bin/busybox"), newc.directory("dev"),
            newc.char_device("dev/console", 5, 1), newc.regular("empty", b""),
            newc.regular("bin/odd", b"x" * 5)]


def test_cpio_round_trip_and_order() -> None:
    entries = sample_entries()
    archive = newc.write(entries)
    back = newc.read(archive)
    assert [e.path for e in back] == ["bin", "bin/a", "bin/odd", "bin/sh", "dev", "dev/console", "empty"]
    assert {e.path: e for e in back} == {e.path: e for e in entries}
    assert newc.write(list(reversed(entries))) == archive        # order-independent bytes
    assert len(archive) % 4 == 0 and archive.startswith(b"070701")


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text("abcxyz_-.0", min_size=1, max_size=12).filter(lambda s: s not in (".", "..")),
                       st.binary(max_size=64), max_size=8))
def test_cpio_round_trip_property(files: dict[str, bytes]) -> None:
    entries = [newc.directory("d")] + [newc.regular(f"d/{name}", data) for name, data in files.items()]
    assert sorted(newc.read(newc.write(entries)), key=lambda e: e.path) == sorted(entries, key=lambda e: e.path)


@pytest.mark.parametrize("entries, message", [
    ([newc.regular("a/b", b"")], "no parent"),
    ([newc.regular("a", b""), newc.regular("a", b"")], "duplicate"),
    ([newc.regular("../x", b"")], "bad cpio path"),
    ([newc.regular("/abs", b"")], "bad cpio path"),
    ([newc.Entry("d", stat.S_IFDIR | 0o755, b"data")], "only files and symlinks"),
    ([newc.Entry("f", stat.S_IFREG | 0o644, mtime=1 << 33)], "32 bits"),
])
def test_cpio_writer_rejects(entries: list[newc.Entry], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        newc.write(entries)


def test_cpio_reader_rejects_malformed() -> None:
    archive = newc.write(sample_entries())
    with pytest.raises(ValueError, match="no trailer"):
        newc.read(archive[:-124])
    with pytest.raises(ValueError, match="magic"):
        newc.read(b"070702" + archive[6:])
    with pytest.raises(ValueError, match="digits"):
        newc.read(archive[:6] + b"zz" + archive[8:])
    huge = archive[:54] + b"7FFFFFFF" + archive[62:]          # filesize of the first entry
    with pytest.raises(ValueError, match="overruns"):
        newc.read(huge)


# -- kernel files and modules ---------------------------------------------------------------

def test_kernel_parsers_reject_malformed() -> None:
    with pytest.raises(ValueError, match="not a bzImage"):
        kernelimage.bzimage_payload(b"\0" * 4096)
    bz = bytearray(4096)
    bz[0x1FE:0x200] = b"\x55\xaa"
    bz[0x202:0x206] = b"HdrS"
    bz[0x206:0x208] = (0x20F).to_bytes(2, "little")
    bz[0x1F1] = 1
    bz[0x248:0x250] = (0).to_bytes(4, "little") + (1 << 20).to_bytes(4, "little")
    with pytest.raises(ValueError, match="outside the file"):
        kernelimage.bzimage_payload(bytes(bz))
    with pytest.raises(ValueError, match="unknown kernel payload"):
        kernelimage.decompress_payload(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="ELF64"):
        kernelimage.elf_notes(b"\x7fELF" + b"\1" * 60)
    with pytest.raises(ValueError, match="ARM"):
        kernelimage.arm64_header(b"\0" * 64)
    with pytest.raises(ValueError, match="ELF64"):
        kernelimage.modinfo(b"not a module")


def test_module_load_order_follows_depends_and_softdeps() -> None:
    infos = {"ext4": {"depends": ["jbd2,mbcache,crc16"], "softdep": ["pre: crc32c"]},
             "jbd2": {"depends": [""]}, "mbcache": {"depends": [""]}, "crc16": {"depends": [""]},
             "crc32c_generic": {"alias": ["crypto-crc32c", "crc32c"]},
             "crc32c_intel": {"alias": ["crypto-crc32c", "crc32c"]},
             "virtio_blk": {"depends": ["virtio,virtio_ring"]}}
    order = kernelimage.load_order(["virtio", "virtio_blk", "ext4"], infos,
                                   {"crc32c": "crc32c_generic"}, builtin={"virtio", "virtio_ring"})
    assert order == ["virtio_blk", "jbd2", "mbcache", "crc16", "crc32c_generic", "ext4"]
    with pytest.raises(ValueError, match="neither in the package"):
        kernelimage.load_order(["nosuch"], infos, {}, set())
    with pytest.raises(ValueError, match="cycle"):
        kernelimage.load_order(["a"], {"a": {"depends": ["b"]}, "b": {"depends": ["a"]}}, {}, set())


def test_release_and_packages_parsing() -> None:
    release = ("Origin: Debian\nSHA256:\n 00ff 12 main/binary-arm64/Packages\n"
               " ABCD 345 main/binary-arm64/Packages.xz\nAcquire-By-Hash: yes\n")
    assert debarchive.release_sha256(release, "main/binary-arm64/Packages.xz") == ("abcd", 345)
    assert debarchive.release_sha256(release, "main/binary-amd64/Packages.xz") is None
    text = ("Package: busybox-static\nVersion: 1:1.35\nArchitecture: arm64\nFilename: pool/b.deb\n"
            "Size: 10\nSHA256: AB\nDescription: x\n more\n\nPackage: broken\nVersion: 1\n")
    assert list(debarchive.parse_packages(text, "debian", "bookworm")) == [
        debarchive.Package("busybox-static", "1:1.35", "arm64", "pool/b.deb", "ab", 10, "debian", "bookworm")]


# -- the workload -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native_workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (apt-get install gcc)")
    out = tmp_path_factory.mktemp("wl") / "wl"
    assemble.compile_workload("gcc", out)
    return out


def test_workload_runs_natively(native_workload: Path, tmp_path: Path) -> None:
    data = tmp_path / "wl.bin"
    result = subprocess.run([str(native_workload), "mem=1M", "file=96K", "passes=3", f"path={data}"],
                            capture_output=True, timeout=60, env={"wl_mem": "8M"}, check=False)
    assert result.returncode == 0, result
    assert result.stdout.decode().splitlines() == [
        f"wl: start mem 1 MiB file 96 KiB passes 3 path {data}",
        *(f"wl: pass {n} ok mem 1 MiB file 96 KiB" for n in (1, 2, 3)), "wl: done 3 passes"]
    assert data.stat().st_size == 96 << 10
    env = subprocess.run([str(native_workload)], capture_output=True, timeout=60, check=False,
                         env={"wl_mem": "64K", "wl_file": "0", "wl_passes": "1", "wl_path": str(data)})
    assert env.stdout.decode().splitlines()[0] == f"wl: start mem 64 KiB file 0 MiB passes 1 path {data}"


@pytest.mark.parametrize("args, status, line", [
    (["mem=12Q"], 2, "wl: error: bad mem value '12Q'"),
    (["passes=-1"], 2, "wl: error: bad passes value '-1'"),
    (["path=relative"], 2, "wl: error: bad path value 'relative'"),
    (["bogus"], 2, "wl: error: unknown argument 'bogus' (mem= file= passes= path=)"),
    (["mem=64K", "passes=1", "path=/nonexistent-dir/wl.bin"], 1, "wl: pass 1 BAD file open for writing errno 2"),
])
def test_workload_rejects(native_workload: Path, args: list[str], status: int, line: str) -> None:
    result = subprocess.run([str(native_workload), *args], capture_output=True, timeout=60, env={},
                            check=False)
    assert result.returncode == status
    assert result.stdout.decode().splitlines()[-1] == line


def test_workload_build_is_reproducible(native_workload: Path, tmp_path: Path) -> None:
    again = tmp_path / "wl"
    assemble.compile_workload("gcc", again)
    assert again.read_bytes() == native_workload.read_bytes()


def test_committed_aarch64_workload_is_a_static_executable() -> None:
    data = assemble.WORKLOAD_BINARIES["aarch64"].read_bytes()
    assemble.check_elf_machine(data, "aarch64", "workload")
    assert data[16] == 2                                     # ET_EXEC: static, no interpreter
    assert b"/lib/ld-linux" not in data and len(data) < 64 << 10


@pytest.mark.parametrize("unused", [pytest.param(None, marks=tool_marks("aarch64-linux-gnu-gcc"), id="aarch64")])
def test_committed_aarch64_workload_matches_its_source(unused: None, tmp_path: Path) -> None:
    out = tmp_path / "wl"
    assemble.compile_workload("aarch64-linux-gnu-gcc", out)
    assert out.read_bytes() == assemble.WORKLOAD_BINARIES["aarch64"].read_bytes(), (
        "fixtures/linux/workload-aarch64.bin is stale: rebuild it from workload.c "
        "(python -c 'from hv_fixtures.linux import assemble; from pathlib import Path; "
        "assemble.compile_workload(\"aarch64-linux-gnu-gcc\", assemble.WORKLOAD_BINARIES[\"aarch64\"])')")


def test_init_script_parses() -> None:
    subprocess.run(["sh", "-n", str(assemble.INIT_SCRIPT)], check=True, timeout=30)


def test_build_cli_rejects_unknown_arch() -> None:
    result = subprocess.run(["python", str(build_images.HERE / "build_images.py"), "--arch", "sparc"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["build_images: error: unknown arch 'sparc': choose from x86_64, aarch64"]


def test_unreachable_archive_skips_naming_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed port on loopback: the download fails for real, the cache is empty.
    monkeypatch.setitem(debarchive.MIRRORS, "debian", "http://127.0.0.1:9/debian")
    monkeypatch.setitem(debarchive.MIRRORS, "debian-security", "http://127.0.0.1:9/debian-security")
    with pytest.raises(pytest.skip.Exception, match=re.escape(f"{BUILD_COMMAND} --arch aarch64")):
        linux_images("aarch64", cache=tmp_path)
    assert not (tmp_path / "aarch64" / "manifest.json").exists()


# -- the built images (skipped, naming the build command, where they cannot be built) -----

@pytest.fixture(scope="module", params=ARCHES)
def images(request: pytest.FixtureRequest) -> LinuxImages:
    return linux_images(request.param)


def test_manifest_matches_the_files(images: LinuxImages) -> None:
    manifest = images.manifest
    assert set(manifest["outputs"]) == set(build_images.OUTPUTS[images.arch])
    for name, facts in manifest["outputs"].items():
        path = images.directory / name
        assert debarchive.sha256_file(path) == facts["sha256"] and path.stat().st_size == facts["size"], name
    debian = build_images.ARCHES[images.arch].debian
    names = sorted(p["name"] for p in manifest["packages"])
    assert names[0] == "busybox-static" and re.fullmatch(rf"linux-image-6\.1\.0-\d+-{debian}", names[1])
    for package in manifest["packages"]:
        deb = images.directory.parent / "debs" / os.path.basename(package["filename"])
        assert debarchive.sha256_file(deb) == package["sha256"]
    combined = json.loads((images.directory.parent / "manifest.json").read_text())
    assert combined["arches"][images.arch]["outputs"] == manifest["outputs"]


def test_images_match_the_lock_when_built_from_its_inputs(images: LinuxImages) -> None:
    locked = build_images.load_lock()["arches"].get(images.arch)
    if locked is None:
        pytest.fail(f"{build_images.LOCK_FILE} has no {images.arch} entry: run {BUILD_COMMAND} --write-lock")
    manifest = images.manifest
    if manifest["warnings"]:
        pytest.skip(f"the pinned packages are no longer served: {manifest['warnings']}")
    assert manifest["packages"] == locked["packages"]
    same = ["vmlinuz", "vmlinux"] if images.arch == "x86_64" else list(locked["outputs"])
    if manifest["workload_sha256"] == locked["workload_sha256"]:
        same = list(locked["outputs"])           # the host gcc built the same workload
    for name in same:
        if name in locked["outputs"]:
            assert manifest["outputs"][name] == locked["outputs"][name], name


def test_x86_vmlinux_is_the_bzimage_payload_with_a_pvh_note() -> None:
    images = linux_images("x86_64")
    assert images.vmlinux is not None
    vmlinux = images.vmlinux.read_bytes()
    _, inner = kernelimage.decompress_payload(kernelimage.bzimage_payload(images.vmlinuz.read_bytes()))
    assert inner == vmlinux
    entry = kernelimage.pvh_entry(vmlinux)
    assert f"{entry:#x}" == images.manifest["kernel"]["pvh_entry"] and 0x100000 <= entry < 1 << 32
    if shutil.which("readelf"):                              # binutils' own reading of the notes
        notes = subprocess.run(["readelf", "-n", str(images.vmlinux)], capture_output=True,
                               text=True, check=True, timeout=60).stdout
        assert re.search(r"Xen\s+0x0000000[48]\s+Unknown note type: \(0x00000012\)", notes)


def test_arm64_image_header() -> None:
    images = linux_images("aarch64")
    image = images.vmlinuz.read_bytes()
    assert image[56:60] == b"ARM\x64"
    header = kernelimage.arm64_header(image)
    assert header.image_size >= len(image) and header.flags & 1 == 0   # little-endian kernel


def test_initramfs_holds_init_busybox_workload_and_modules(images: LinuxImages) -> None:
    entries = {e.path: e for e in newc.read(gzip.decompress(images.initramfs.read_bytes()))}
    assert entries["init"].data == assemble.INIT_SCRIPT.read_bytes() and entries["init"].mode & 0o111
    assert entries["dev/console"].rdev == (5, 1) and stat.S_ISCHR(entries["dev/console"].mode)
    assert entries["bin/sh"].data == b"/bin/busybox" and stat.S_ISLNK(entries["bin/sh"].mode)
    assemble.check_elf_machine(entries["bin/busybox"].data, images.arch, "busybox")
    assemble.check_elf_machine(entries["bin/wl"].data, images.arch, "workload")
    order = entries["lib/modules/hv-modules.list"].data.decode().split()
    assert order == images.manifest["modules"]
    release = images.manifest["kernel_release"]
    loaded: list[str] = []
    for path in order:
        info = kernelimage.modinfo(entries[f"lib/modules/{path}"].data)
        assert info["vermagic"][0].startswith(release + " ")
        deps = [d for d in info.get("depends", [""])[0].split(",") if d]
        assert set(deps) <= set(loaded), f"{path} needs {deps} before it"
        loaded.append(kernelimage.module_name(path))
    assert {"virtio_pci", "virtio_blk", "virtio_net", "net_failover", "ext4", "jbd2", "crc32c_generic"} <= set(loaded)
    assert all(e.mtime == assemble.EPOCH and e.uid == 0 for e in entries.values())


@pytest.mark.parametrize("tool", ["dumpe2fs", "debugfs"])
def test_rootfs_is_ext4_with_init_and_workload(images: LinuxImages, tool: str) -> None:
    assemble.require(tool, "e2fsprogs")
    if tool == "dumpe2fs":
        head = subprocess.run([assemble.require("dumpe2fs", "e2fsprogs"), "-h", str(images.rootfs)],
                              capture_output=True, text=True, check=True, timeout=60).stdout
        assert re.search(r"Filesystem magic number:\s+0xEF53", head)
        assert re.search(rf"Filesystem UUID:\s+{assemble.ROOTFS_UUID}", head)
        assert "has_journal" in head and "extent" in head and "metadata_csum" in head
        return
    debugfs = assemble.require("debugfs", "e2fsprogs")

    def cat(path: str) -> bytes:
        return subprocess.run([debugfs, "-R", f"cat {path}", str(images.rootfs)],
                              capture_output=True, check=True, timeout=60).stdout
    assert cat("/sbin/init") == assemble.INIT_SCRIPT.read_bytes()
    wl = cat("/bin/wl")
    assemble.check_elf_machine(wl, images.arch, "workload")
    assert wl == gzip_member(images, "bin/wl")
    listing = subprocess.run([debugfs, "-R", "ls -l /bin", str(images.rootfs)], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    assert re.search(r"120777\s+\(7\)\s+0\s+0\s+\d+\s+14-Nov-2023 22:13 sh\b", listing)
    fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    fsck_run = subprocess.run([fsck, "-fn", str(images.rootfs)], capture_output=True, timeout=60, check=False)
    assert fsck_run.returncode == 0, fsck_run.stdout


def gzip_member(images: LinuxImages, path: str) -> bytes:
    return next(e.data for e in newc.read(gzip.decompress(images.initramfs.read_bytes())) if e.path == path)
