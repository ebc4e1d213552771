"""-drive / -device parsing: accepted forms, and one clear DevConfigError line for
everything else (hypothesis: no other exception for any input)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv.devconfig import DevConfigError, DeviceConfig, DriveConfig, parse_device, parse_drive


@pytest.fixture
def img(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    return path


def test_seed_drive_and_device(img):
    drive = parse_drive(f"file={img},id=rootfs,readonly=off,direct=off")
    assert drive == DriveConfig("rootfs", img, False, False, None, "raw")
    device = parse_device("virtio-blk-pci,drive=rootfs,id=rootfs,bus=pcie.0,addr=0")
    assert device == DeviceConfig("virtio-blk-pci", "rootfs", "rootfs", "pcie.0", 0, 0, None)


def test_all_drive_options(img):
    drive = parse_drive(f"file={img},id=d1,readonly=on,direct=on,serial=ABC-123,if=none,format=raw")
    assert (drive.readonly, drive.direct, drive.serial) == (True, True, "ABC-123")


def test_device_options():
    device = parse_device("virtio-blk-pci,drive=d,id=v,addr=0x1f.7,serial=xyz")
    assert (device.slot, device.function, device.serial, device.addr) == (31, 7, "xyz", "0x1f.7")
    assert parse_device("virtio-blk-pci,drive=d").id == "d"            # id defaults to the drive id
    assert parse_device("virtio-blk-pci,drive=d").slot is None         # first free slot


@pytest.mark.parametrize("value,message", [
    ("", "empty value"),
    ("file=X", "id= is required"),
    ("id=a", "file= is required"),
    ("file=X,id=a,,", "empty item"),
    ("file=X,id=a,readonly", "not key=value"),
    ("file=X,id=a,readonly=maybe", "readonly=maybe: expected on or off"),
    ("file=X,id=a,direct=1", "direct=1: expected on or off"),
    ("file=X,id=a,format=qcow2", "only raw"),
    ("file=X,id=a,if=virtio", "only if=none"),
    ("file=X,id=a,cache=none", "unknown parameter 'cache'"),
    ("file=X,id=a,id=b", "given twice"),
    ("file=X,id=1a", "ids start with a letter"),
    ("file=X,id=a,serial=" + "x" * 21, "at most 20"),
    ("file=X,id=a,serial=a\tb", "printable"),
    ("file=/nonexistent/disk.img,id=a", "no such file"),
    ("=x,id=a", "has no key"),
])
def test_drive_errors(value, message, img):
    value = value.replace("file=X", f"file={img}")
    with pytest.raises(DevConfigError, match=message) as info:
        parse_drive(value)
    text = str(info.value)
    assert text.startswith("-drive") and "\n" not in text


def test_drive_directory_and_unwritable(tmp_path, img):
    with pytest.raises(DevConfigError, match="is a directory"):
        parse_drive(f"file={tmp_path},id=a")
    if os.geteuid() == 0:
        # root ignores permission bits; an immutable file refuses it writes.
        subprocess.run(["chattr", "+i", str(img)], check=True)
        try:
            with pytest.raises(DevConfigError, match="cannot open to read and write: Operation not permitted"):
                parse_drive(f"file={img},id=a")
            assert parse_drive(f"file={img},id=a,readonly=on").readonly
        finally:
            subprocess.run(["chattr", "-i", str(img)], check=True)
    else:
        img.chmod(0o400)
        with pytest.raises(DevConfigError, match="cannot open to read and write"):
            parse_drive(f"file={img},id=a")
        parse_drive(f"file={img},id=a,readonly=on")
        img.chmod(0o000)
        with pytest.raises(DevConfigError, match="cannot open to read"):
            parse_drive(f"file={img},id=a,readonly=on")


def test_root_port_parses_stratovirt_syntax():
    device = parse_device("pcie-root-port,port=0x1,addr=0x1,bus=pcie.0,id=pcie.1,chassis=2,slot=9,multifunction=on")
    assert (device.driver, device.id, device.bus, device.slot, device.function) == ("pcie-root-port", "pcie.1",
                                                                                    "pcie.0", 1, 0)
    assert (device.port, device.chassis, device.physical_slot, device.multifunction) == (1, 2, 9, True)
    blk = parse_device("virtio-blk-pci,drive=d1,id=hp0,bus=pcie.1,addr=0x0")
    assert (blk.bus, blk.slot, blk.function) == ("pcie.1", 0, 0)


@pytest.mark.parametrize("value,message", [
    ("", "empty value"),
    ("drive=d", "first item must be the device type"),
    ("e1000,drive=d", "unknown device type 'e1000'"),
    ("virtio-blk-pci", "drive= is required"),
    ("virtio-blk-pci,drive=d,bus=1x", "bus='1x': ids start with a letter"),   # an unknown bus: the wiring
    ("pcie-root-port,port=1", "id= is required"),
    ("pcie-root-port,id=p1,bus=p0", "bus=p0: a root port goes on pcie.0"),
    ("pcie-root-port,id=p1,port=0x100", "port=0x100: out of range"),
    ("pcie-root-port,id=p1,slot=x", "slot=x: not a number"),
    ("pcie-root-port,id=p1,drive=d", "unknown parameter 'drive'"),
    ("virtio-blk-pci,drive=d,addr=0x20", "slot 0x20 out of range"),
    ("virtio-blk-pci,drive=d,addr=3.8", "function 8 out of range"),
    ("virtio-blk-pci,drive=d,addr=zz", "not a hexadecimal"),
    ("virtio-blk-pci,drive=d,addr=1.2.3", "SLOT or SLOT.FUNCTION"),
    ("virtio-blk-pci,drive=d,speed=9", "unknown parameter 'speed'"),
    ("virtio-blk-pci,drive=d,id=-x", "ids start with a letter"),
    ("virtio-blk-pci,drive=d,serial=" + "s" * 21, "at most 20"),
])
def test_device_errors(value, message):
    with pytest.raises(DevConfigError, match=message) as info:
        parse_device(value)
    text = str(info.value)
    assert text.startswith("-device") and "\n" not in text


text = st.text(alphabet=st.sampled_from(list("abcdefirvxp=,.-_01f/ \tonfalsetruepcie")), max_size=60)


@settings(max_examples=400, deadline=None)
@given(value=text)
def test_fuzzed_values_raise_only_devconfigerror(value):
    for parse in (parse_drive, parse_device):
        try:
            parse(value)
        except DevConfigError as exc:
            assert "\n" not in str(exc)
