"""The launcher's command line: every malformed option is one line and exit 1."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hv.config import OPTIONS, USAGE, ConfigError, parse_args, parse_size
from tests.helpers import FIXTURES, ROOT

KERNEL = str(ROOT / "pyproject.toml")  # any readable file passes the option check
HELLO_X86 = str(FIXTURES / "x86_64" / "hello.elf")


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
    (["-machine", "q35", "-kernel", KERNEL, "-m", "65537"], "at most 65536 MiB"),
    (["-machine", "q35", "-kernel", KERNEL, "-m", "65G"], "at most 65536 MiB"),
    (["-machine", "q35", "-kernel", KERNEL, "-m", "1T"], "at most 65536 MiB"),
    (["-machine", "virt", "-kernel", KERNEL, "-m", "65537"], "at most 65536 MiB"),
    (["-machine", "q35", "-kernel", KERNEL, "--bogus"], "unknown option '--bogus'"),
    (["-machine", "q35", "-kernel", KERNEL, "-incoming", "deferred"], "-incoming"),
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


def run_hv(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hv", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.parametrize("flag", ["-V", "-version", "--version"])
def test_version_flags(flag):
    out = run_hv(flag)
    assert out.returncode == 0 and re.fullmatch(r"hv \d+\.\d+\.\d+\S*\n", out.stdout), out
    assert out.stderr == ""


def test_every_option_takes_two_dashes():
    single = ["-machine", "virt", "-kernel", KERNEL, "-append", "a b", "-m", "1G", "-smp", "2", "-serial", "stdio",
              "-accel", "unicorn", "-name", "vm1", "-D", "/tmp/hv.log", "-S", "-qmp", "unix:/tmp/q.sock,server,nowait",
              "-chardev", "socket,id=m,path=/tmp/m.sock,server,nowait", "-mon", "chardev=m,mode=control",
              "-drive", f"file={KERNEL},id=d0", "-device", "virtio-blk-pci,drive=d0,id=b0",
              "-netdev", "socket,id=n0,listen=/tmp/n.sock", "-device", "virtio-net-pci,netdev=n0,id=x0",
              "-incoming", "tcp:127.0.0.1:0"]
    double = ["-" + a if a.startswith("-") and a in OPTIONS else a for a in single]
    assert double.count("--machine") == 1 and double.count("--S") == 1
    assert parse_args(double) == parse_args(single)
    assert parse_args(["--M", "q35", "--kernel", KERNEL]) == parse_args(["-M", "q35", "-kernel", KERNEL])
    for flag in ("--h", "--help", "--help"):
        assert parse_args([flag]).action == "help"
    with pytest.raises(ConfigError, match="option -m given more than once"):
        parse_args(["-machine", "q35", "-kernel", KERNEL, "-m", "64", "--m", "128"])
    assert USAGE.count("two dashes") == 1


def test_two_dash_spelling_boots_a_guest(tmp_path: Path):
    serial = tmp_path / "serial"
    out = run_hv("--machine", "q35", "--accel", "unicorn", "--m", "64", "--kernel",
                 str(FIXTURES / "x86_64" / "hello.elf"), "--append", "dashes", "--serial", f"file,path={serial}")
    assert out.returncode == 0, out.stderr
    assert "cmdline: dashes" in serial.read_text()


def test_help_lists_every_subcommand():
    out = run_hv("--help")
    assert out.returncode == 0
    for subcommand in ("hv qmp SOCKET COMMAND", "hv bench migrate", "hv bench blk"):
        assert subcommand in out.stdout, subcommand
    assert "-V, -version, --version" in out.stdout and "-incoming defer" in out.stdout


def test_qmp_subcommand_names_itself_as_invoked():
    out = run_hv("qmp", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: hv qmp "), out.stdout
    out = run_hv("qmp", "/tmp/x", "cmd", "novalue")
    assert out.returncode == 1 and out.stderr == "hv qmp: argument 'novalue' is not key=value\n"
    out = subprocess.run([sys.executable, "-m", "hv.qmp.client", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: hv-qmp "), out.stdout


@pytest.mark.parametrize("subcommand", [["qmp", "--help"], ["migrate", "--help"]])
def test_terminal_subcommands_do_not_load_the_vmm(subcommand):
    """``hv qmp`` and ``hv migrate`` run without importing the launcher, its machine and
    backends (hv.command dispatches them first): what they import is checked, not timed."""
    code = ("import sys\nfrom hv.command import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('hv.cli', 'hv.machine', 'hv_backends.unicorn', 'hv.devices.virtio_blk') "
            "if m in sys.modules]\nprint('loaded:', heavy, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *subcommand], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout.startswith("usage: hv ") and "loaded: []" in out.stderr, (out.stdout, out.stderr)


def test_incoming_defer_needs_no_kernel():
    config = parse_args(["-machine", "q35", "-incoming", "defer"]).config
    assert config.incoming == "defer" and config.kernel is None


def test_q35_memory_limit_is_64_gib():
    """q35 RAM up to 64 GiB (2 GiB low + the rest above 4 GiB), as README says; the old
    2816 MiB edge (RAM just below the ECAM) and one MiB more both parse."""
    for text, size in (("2816", 0xB000_0000), ("2817", 2817 << 20), ("8G", 8 << 30), ("65536", 64 << 30),
                       ("64G", 64 << 30)):
        assert parse_args(["-machine", "q35", "-kernel", KERNEL, "-m", text]).config.memory_bytes == size
    readme = (ROOT / "README.md").read_text()
    assert "up to 64 GiB" in readme and "2816 MiB" in readme and "not supported yet" not in readme


def test_q35_largest_single_region_memory_boots(tmp_path: Path):
    """2816 MiB is still one region below the ECAM: mem_upper is all of it but 1 MiB."""
    serial = tmp_path / "serial"
    out = run_hv("-machine", "q35", "-accel", "unicorn", "-m", "2816", "-kernel",
                 str(FIXTURES / "x86_64" / "hello.elf"), "-serial", f"file,path={serial}")
    assert out.returncode == 0, out.stderr
    assert "hello from hv guest (x86_64)" in serial.read_text()
    assert "mem_upper 2882560 KiB" in out.stderr  # 2816 MiB - 1 MiB of low memory


def test_q35_split_memory_boots(tmp_path: Path):
    """One MiB more splits RAM: 2 GiB stay low (mem_upper 2 GiB - 1 MiB), the rest is above 4 GiB."""
    serial = tmp_path / "serial"
    out = run_hv("-machine", "q35", "-accel", "unicorn", "-m", "2817", "-kernel",
                 str(FIXTURES / "x86_64" / "hello.elf"), "-serial", f"file,path={serial}")
    assert out.returncode == 0, out.stderr
    assert "hello from hv guest (x86_64)" in serial.read_text()
    assert "mem_upper 2096128 KiB" in out.stderr


def test_virt_power_off_is_logged():
    out = run_hv("-machine", "virt", "-accel", "unicorn", "-kernel", str(FIXTURES / "aarch64" / "hello.elf"))
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines()[-1] == "hv: guest requested power-off (PSCI SYSTEM_OFF)"


@pytest.fixture
def busy_port():
    """A port something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("hv: error: ") and "[Errno" not in out.stderr, out.stderr
    return last


def test_busy_qmp_port_error_has_no_errno(busy_port):
    last = one_error_line(run_hv("-machine", "q35", "-accel", "unicorn", "-kernel", HELLO_X86,
                                 "-qmp", f"tcp:127.0.0.1:{busy_port},server,nowait"))
    assert last == f"hv: error: cannot listen on tcp:127.0.0.1:{busy_port}: Address already in use"


def test_bad_qmp_path_error_has_no_errno(tmp_path: Path):
    path = tmp_path / "no" / "dir" / "q.sock"
    last = one_error_line(run_hv("-machine", "q35", "-accel", "unicorn", "-kernel", HELLO_X86,
                                 "-qmp", f"unix:{path},server,nowait"))
    assert last == f"hv: error: cannot listen on unix:{path}: No such file or directory"


def test_busy_incoming_port_error_has_no_errno(busy_port):
    last = one_error_line(run_hv("-machine", "q35", "-accel", "unicorn", "-incoming", f"tcp:127.0.0.1:{busy_port}"))
    assert last == (f"hv: error: incoming migration failed: cannot listen on tcp:127.0.0.1:{busy_port}: "
                    "Address already in use")
