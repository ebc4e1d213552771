"""The launcher's command line: every malformed option is one line and exit 1."""
from __future__ import annotations

import subprocess
import sys

import pytest

from hv.config import ConfigError, parse_args, parse_size
from tests.helpers import FIXTURES, ROOT

KERNEL = str(ROOT / "pyproject.toml")  # any readable file passes the option check


def test_minimal_config():
    config = parse_args(["-machine", "q35", "-kernel", KERNEL]).config
    assert config.machine == "q35" and config.arch.value == "x86_64"
    assert config.memory_bytes == 256 << 20 and config.smp == 1


@pytest.mark.parametrize("text,expected", [("256", 256 << 20), ("256M", 256 << 20), ("1G", 1 << 30),
                                           ("524288K", 512 << 20), ("2GiB", 2 << 30)])
def test_sizes(text, expected):
    assert parse_size(text, "-m") == expected


def test_full_stratovirt_line():
    config = parse_args(["-machine", "type=virt,dump-guest-core=off", "-kernel", KERNEL, "-append",
                         "console=ttyAMA0 mib=4", "-m", "1G", "-smp", "cpus=2", "-serial", "stdio",
                         "-qmp", "unix:/tmp/x.sock,server,nowait", "-name", "guest=vm1", "-S",
                         "-accel", "unicorn"]).config
    assert (config.machine, config.smp, config.memory_bytes) == ("virt", 2, 1 << 30)
    assert config.start_paused and config.accel == "unicorn" and config.name == "vm1"
    assert [(q.kind, q.path) for q in config.qmp] == [("unix", "/tmp/x.sock")]


BAD = [
    (["-machine", "pc", "-kernel", KERNEL], "unknown machine type 'pc'"),
    (["-kernel", KERNEL], "-machine is required"),
    (["-machine", "q35"], "-kernel is required"),
    (["-machine", "q35", "-kernel", "/no/such/file"], "no such file"),
    (["-machine", "q35", "-kernel", "/"], "not a regular file"),
    (["-machine", "q35", "-kernel", KERNEL, "-m", "lots"], "invalid size"),
    (["-machine", "q35", "-kernel", KERNEL, "-m", "4"], "at least 16 MiB"),
    (["-machine", "q35", "-kernel", KERNEL, "-m", "8G"], "at most 3072 MiB"),
    (["-machine", "q35", "-kernel", KERNEL, "-smp", "0"], "between 1 and"),
    (["-machine", "q35", "-kernel", KERNEL, "-smp", "two"], "invalid vCPU count"),
    (["-machine", "q35", "-kernel", KERNEL, "-accel", "tcg"], "unknown accelerator 'tcg'"),
    (["-machine", "q35", "-kernel", KERNEL, "-serial", "pty"], "unsupported value 'pty'"),
    (["-machine", "q35", "-kernel", KERNEL, "-serial", "file,path=/no/dir/x"], "does not exist"),
    (["-machine", "q35", "-kernel", KERNEL, "-bogus"], "unknown option '-bogus'"),
    (["-machine", "q35", "-kernel", KERNEL, "stray"], "unexpected argument 'stray'"),
    (["-machine", "q35", "-kernel"], "needs a value"),
    (["-machine", "q35", "-machine", "virt", "-kernel", KERNEL], "more than once"),
    (["-machine", "q35,mem-share=on", "-kernel", KERNEL], "mem-share=on"),
    (["-machine", "q35,frobnicate=1", "-kernel", KERNEL], "unknown property 'frobnicate'"),
    (["-machine", "q35", "-kernel", KERNEL, "-D", "/no/dir/log"], "does not exist"),
    (["-machine", "q35", "-kernel", KERNEL, "-daemonize"], "not supported"),
    (["-machine", "q35", "-kernel", KERNEL, "-qmp", "unix:/tmp/x"], "-qmp"),
    (["-machine", "q35", "-kernel", KERNEL, "-qmp", "tcp:host:notaport,server,nowait"], "-qmp"),
    (["-machine", "q35", "-kernel", KERNEL, "-mon", "chardev=m,mode=control"], "no -chardev with id 'm'"),
    (["-machine", "q35", "-kernel", KERNEL, "-chardev", "pty,id=m"], "-chardev"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_options_raise(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_args(argv)


@pytest.mark.parametrize("argv,message", BAD[:6], ids=[m for _, m in BAD[:6]])
def test_bad_options_exit_1_with_one_line(argv, message):
    result = subprocess.run([sys.executable, "-m", "hv", *argv], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hv: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_help_and_version():
    out = subprocess.run([sys.executable, "-m", "hv", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0 and "-machine" in out.stdout
    out = subprocess.run([sys.executable, "-m", "hv", "-version"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("hv ")


def test_wrong_arch_kernel_is_one_line():
    kernel = FIXTURES / "aarch64" / "hello.elf"
    result = subprocess.run([sys.executable, "-m", "hv", "-machine", "q35", "-kernel", str(kernel),
                             "-accel", "unicorn"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("hv: error: -kernel:")
    assert "Traceback" not in result.stderr
