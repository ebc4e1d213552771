"""Real Linux guests on hv, end to end, as the seed's walkthrough runs them.

Debian 12's kernel with the busybox initramfs and ext4 rootfs of
fixtures/linux/build_images.py (built on first use; the tests skip naming the command
when this machine cannot build them), booted by ``hv`` processes on Unicorn with the
walkthrough's line: ``-kernel``, ``-append "console=... reboot=k panic=1 root=/dev/vda"``,
``-initrd``, the rootfs as ``virtio-blk-pci`` at ``bus=pcie.0,addr=0``, ``-qmp unix:``
and ``-serial stdio``. The guest's /init mounts /dev/vda and runs the workload ``wl`` in
the background (``wl: pass N ok`` per pass: memory and a file rewritten and verified)
with a busybox shell on the console, which the tests type into through hv's stdin.

What a failure means: a missing ``wl: pass`` is a guest that stopped making progress; a
``BAD`` line, a gap or a repeat in the pass numbers is guest memory or disk that changed
under it (across a migration: state lost or duplicated); a shell that does not answer is
broken console input.

The long ones are marked ``slow`` and bounded unless HV_SLOW=1 (CI runs the bounded
version). Measured on the shared 2-core development host (virt, Unicorn): each test
13-23 s, all of them 81 s with ``-n 2``; the 100-hop soak (HV_SLOW=1) 290 s.
"""
from __future__ import annotations

import logging
import re

import pytest

from tests.e2e.conftest import BROKEN_RE, PASS_RE, SLOW, LinuxLab, LinuxVm
from tests.e2e.netpeer import NetPeer

log = logging.getLogger(__name__)

BOOT = 300.0          # seconds: kernel + initramfs + rootfs to the "ready" line
PASS = 180.0          # seconds for workload passes
# q35 (x86_64) Linux takes its TSC, APIC-timer and delay-loop calibration from hv's CPUID
# leaves 0x15/0x16 (hv/cpuid.py), so it needs no PIT/HPET/PM-timer reference to boot.
MACHINES = ["virt", "q35"]
READY_RE = r"hv-init: ready: \S+ \S+ root=/dev/vda "
NET_ARGS = ("-device", "virtio-net-pci,netdev=n0,id=net0,mac=52:54:00:12:34:56,addr=2")


def pass_numbers(text: str) -> list[int]:
    """The workload's pass numbers in order; fails on any BAD pass."""
    passes = [(int(n), verdict) for n, verdict in PASS_RE.findall(text)]
    bad = [n for n, verdict in passes if verdict != "ok"]
    assert not bad, f"workload passes {bad} BAD: {text[-2000:]}"
    return [n for n, _ in passes]


def assert_healthy(text: str) -> list[int]:
    """No broken-guest text, and passes 1, 2, 3, ... with no gap or repeat."""
    broken = BROKEN_RE.search(text)
    assert broken is None, f"guest broke: {broken.group(0)!r} in {text[-3000:]!r}"
    numbers = pass_numbers(text)
    assert numbers == list(range(1, len(numbers) + 1)), f"pass numbers not consecutive: {numbers}"
    return numbers


def last_pass(vm: LinuxVm) -> int:
    numbers = pass_numbers(vm.output())
    return numbers[-1] if numbers else 0


def boot(lab: LinuxLab, machine: str, name: str = "vm", *, append: str = "",
         extra: tuple[str, ...] = (), passes: int = 1) -> LinuxVm:
    """Start the walkthrough's line and wait for the rootfs and ``passes`` workload passes."""
    vm = lab.start(name, lab.command(machine, name, append=append, extra=extra))
    vm.wait_for(READY_RE, BOOT)
    if passes:
        vm.wait_for(rf"wl: pass {passes} ok", PASS)
    return vm


def migrate(src: LinuxVm, uri: str) -> dict:
    reply = src.execute("migrate", uri=uri)
    assert "return" in reply, reply
    result = src.wait_migration()
    assert result["status"] == "completed", result
    return result


def incoming(lab: LinuxLab, transport: str, name: str) -> str:
    return "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{lab.sock_dir}/{name}.mig"


# -- a + b: the walkthrough, and typing into its shell --------------------------------------------

@pytest.mark.parametrize("machine", MACHINES)
def test_seed_walkthrough_boots_to_the_workload_and_its_shell_answers(lab: LinuxLab, machine: str) -> None:
    vm = boot(lab, machine, passes=2)
    vm.shell("echo hv-$((6*7))", r"hv-42")
    vm.shell("grep ' / ' /proc/mounts", r"/dev/vda / ext4 rw")
    vm.shell("printf 'ab\\tc|%s|\\n' \"$(echo x | tr x y)\"", r"ab\tc\|y\|")   # tabs, pipes, quotes
    assert "return" in vm.execute("stop")
    start = len(vm.output())
    vm.type("echo paused-$((1+1))\n")        # typed while paused: waits in the UART
    assert "return" in vm.execute("cont")
    vm.wait_for(r"paused-2", 60, start)
    assert_healthy(vm.output())
    assert vm.execute("query-status")["return"]["status"] == "running"


# -- c: live migration with the workload running, then a snapshot ----------------------------------

@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("machine", MACHINES)
def test_live_migration_keeps_the_workload_and_the_console(lab: LinuxLab, machine: str, transport: str) -> None:
    src = boot(lab, machine, "src", passes=2)
    dst = lab.start("dst", lab.command(machine, "dst", extra=("-incoming", incoming(lab, transport, "dst"))))
    uri = dst.incoming_address()
    dst.type("echo early-$((2+3))\n")      # typed before the guest arrives: it waits for it
    result = migrate(src, uri)
    assert src.execute("query-status")["return"]["status"] == "postmigrate"
    switched = last_pass(src)
    dst.wait_for(rf"wl: pass {switched + 2} ok", PASS)
    dst.wait_for(r"early-5", 60)
    dst.shell("echo hv-$((6*7))", r"hv-42")
    numbers = assert_healthy(src.output() + dst.output())
    log.info("%s %s: switched over after pass %d, %d passes in all, downtime %s ms, %s dirty rounds",
             machine, transport, switched, len(numbers), result.get("downtime"),
             result.get("ram", {}).get("dirty-sync-count"))


@pytest.mark.parametrize("machine", MACHINES)
def test_snapshot_then_restore_continues(lab: LinuxLab, machine: str) -> None:
    src = boot(lab, machine, "src", passes=2)
    snapshot = lab.tmp_path / "snapshot"
    migrate(src, f"file:{snapshot}")
    assert src.execute("query-status")["return"]["status"] == "paused"
    taken = last_pass(src)
    src.close()                              # releases the rootfs lock, as a user quits it
    dst = lab.start("dst", lab.command(machine, "dst", extra=("-incoming", f"file:{snapshot}")))
    dst.wait_for(rf"wl: pass {taken + 2} ok", PASS)
    dst.shell("echo hv-$((6*7))", r"hv-42")
    assert_healthy(src.output() + dst.output())


# -- d: two CPUs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("machine", MACHINES)
def test_smp2_brings_up_both_cpus(lab: LinuxLab, machine: str) -> None:
    vm = boot(lab, machine, extra=("-smp", "2"))
    vm.shell("echo cpus=$(nproc) online=$(cat /sys/devices/system/cpu/online)", r"cpus=2 online=0-1")
    assert_healthy(vm.output())


# -- e: virtio-net ----------------------------------------------------------------------------------

@pytest.mark.parametrize("machine", MACHINES)
def test_virtio_net_pings_the_peer_and_still_does_after_a_migration(lab: LinuxLab, machine: str) -> None:
    """The guest's eth0 (hv_ip=) pings a host on the socket cable (tests/e2e/netpeer.py
    answers ARP and ICMP echo); after a live migration the destination's hv reconnects to
    the cable and the guest pings again."""
    cable = lab.tmp_path / "cable.sock"
    peer = NetPeer(cable)
    try:
        netdev = ("-netdev", f"socket,id=n0,connect={cable}", *NET_ARGS)
        src = boot(lab, machine, "src", append="hv_ip=10.0.2.15/24", extra=netdev)
        src.shell("ping -c 3 -W 10 10.0.2.2", r"3 packets transmitted, 3 packets received", 60)
        assert peer.arp_replies >= 1 and peer.echo_replies >= 3
        dst = lab.start("dst", lab.command(machine, "dst", append="hv_ip=10.0.2.15/24",
                                           extra=(*netdev, "-incoming", incoming(lab, "unix", "dst"))))
        migrate(src, dst.incoming_address())
        before = peer.echo_replies
        dst.shell("ping -c 3 -W 10 10.0.2.2", r"3 packets transmitted, 3 packets received", 60)
        assert peer.echo_replies >= before + 3 and peer.connections == 2
        assert_healthy(src.output() + dst.output())
    finally:
        peer.close()


# -- the soak: many migrations of one guest, broken guests counted ----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("machine", MACHINES)
def test_migration_soak_breaks_no_guest(lab: LinuxLab, machine: str) -> None:
    """One guest migrated hop after hop (tcp and unix alternating, each hop to a fresh hv):
    after every hop the workload must print a new pass, and no BAD line, oops, panic or
    stall may appear anywhere. 100 hops with HV_SLOW=1, 3 otherwise."""
    hops = 100 if SLOW else 3
    current = boot(lab, machine, "vm0")
    outputs: list[str] = []
    broken: list[str] = []
    downtimes: list[int] = []
    for hop in range(1, hops + 1):
        transport = "tcp" if hop % 2 else "unix"
        nxt = lab.start(f"vm{hop}", lab.command(machine, f"vm{hop}", extra=("-incoming",
                                                                              incoming(lab, transport, f"vm{hop}"))))
        result = migrate(current, nxt.incoming_address())
        downtimes.append(int(result.get("downtime", 0)))
        outputs.append(current.output())
        current.close()
        lab.vms.remove(current)
        seen = max(pass_numbers("".join(outputs)), default=0)
        try:
            nxt.wait_for(rf"wl: pass {seen + 1} ok", PASS)
        except AssertionError as exc:
            broken.append(f"hop {hop} ({transport}): no progress: {exc}")
        found = BROKEN_RE.search(nxt.output())
        if found:
            broken.append(f"hop {hop} ({transport}): {found.group(0)!r}")
        current = nxt
        if broken:
            break
    if not broken:
        current.shell("echo hv-$((6*7))", r"hv-42")          # the console still takes input
    outputs.append(current.output())
    log.info("%s soak: %d hops, %d broken, downtime ms min %d max %d", machine, hops, len(broken),
             min(downtimes), max(downtimes))
    assert not broken, broken
    numbers = assert_healthy("".join(outputs))
    assert len(numbers) >= hops + 1


def test_broken_guest_text_is_recognised() -> None:
    """The soak's detector finds what a broken guest prints (and not a healthy run)."""
    healthy = "wl: start mem 16 MiB\nwl: pass 1 ok mem 16 MiB\n/ # echo hi\nhi\nwl: pass 2 ok\n"
    assert BROKEN_RE.search(healthy) is None and assert_healthy(healthy) == [1, 2]
    for text in ["wl: pass 3 BAD mem word 12", "[ 1.0] Kernel panic - not syncing: x",
                 "[ 2.0] Internal error: Oops: 96000004", "hv-init: workload exited with status 1"]:
        assert BROKEN_RE.search(text), text
    with pytest.raises(AssertionError, match="not consecutive"):
        assert_healthy("wl: pass 1 ok\nwl: pass 3 ok\n")
    assert re.search(READY_RE, "hv-init: ready: 6.1.0-50-arm64 aarch64 root=/dev/vda workload=on")
