"""A machine: the front door to guest RAM, devices, vCPU threads and the run state.

The machine is the same whatever the backend and whatever the board. It owns guest RAM
(one mapping, shared with the backend), the port and MMIO buses, and the run state with
the big lock (:mod:`hv.machine.runstate`); everything else is delegated, Firecracker
style:

* the board (:mod:`hv.boards.q35.board`, :mod:`hv.boards.virt.board`) decides which
  devices exist and how they are wired, and how firmware prepares RAM for boot;
* the device manager (:mod:`hv.machine.device_manager`) keeps the device list, wires
  PCI interrupts, hot-plugs, fingerprints and saves/restores devices;
* the vCPU runner (:mod:`hv.machine.vcpu_runner`) runs the vCPU threads: exits, pause,
  kick, park, throttle;
* vCPU power (:mod:`hv.machine.power`): PSCI, INIT/SIPI, guest power-off and reset.

It implements :class:`hv_backends.base.IoHandler`, so a backend forwards every port and
MMIO access here. All device accesses are serialised by the big lock, so devices never
see concurrent accesses. QMP, migration, the launcher and tests use only this class.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hv import cpuid
from hv.boards.base import Board, BoardContext
from hv.boards.q35.board import Q35Board
from hv.boards.virt.board import VirtBoard
from hv.config import VmConfig
from hv.devconfig import DeviceConfig
from hv.devices.bus import Bus
from hv.devices.interfaces import DeviceStateError, OutputSink
from hv.devices.irqline import SharedLine
from hv.machine.device_manager import DeviceManager, DeviceSlot, PersistentDevice
from hv.machine.gic_interrupts import GicController
from hv.machine.interrupts import InterruptController
from hv.machine.pci_wiring import PciSetup
from hv.machine.power import GuestPowerRequests, PsciPower, VcpuPower
from hv.machine.runstate import NOT_POSSIBLE, MachineError, RunState, RunStateTracker
from hv.machine.vcpu_runner import PAUSE_TIMEOUT, THROTTLE_SLICE, VcpuRunner
from hv.memory import GuestMemory, RegionSpec
from hv.state import CpuState, state_from_dict, state_to_dict
from hv_backends.base import Arch, Backend, BackendError, Vcpu

__all__ = [
    "PAUSE_TIMEOUT",
    "THROTTLE_SLICE",
    "DeviceSlot",
    "Machine",
    "MachineError",
    "MachineSnapshot",
    "PersistentDevice",
    "PsciPower",
    "RunState",
    "board_for",
    "ram_layout",
]

log = logging.getLogger(__name__)

# The guest TSC rate of every hv before stream format 1.4 (Unicorn, and KVM where it could
# scale): what a stream without CONFIG tsc_hz is taken to carry (Machine.adopt_tsc_hz).
LEGACY_TSC_HZ = cpuid.TSC_HZ

BOARDS: dict[str, Callable[[], Board]] = {"q35": Q35Board, "virt": VirtBoard}


def board_for(config: VmConfig) -> Board:
    """A fresh board for ``config.machine``."""
    return BOARDS[str(config.machine)]()


@dataclass
class MachineSnapshot:
    """Everything of a paused machine except RAM, in plain values."""

    fingerprint: dict[str, Any]
    cpus: list[CpuState]
    devices: dict[str, dict[str, Any]]  # name -> {"version": int, "state": dict}

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "cpus": [state_to_dict(c) for c in self.cpus],
                "devices": self.devices}

    @classmethod
    def from_dict(cls, raw: Any) -> MachineSnapshot:
        if not isinstance(raw, dict) or set(raw) != {"fingerprint", "cpus", "devices"}:
            raise DeviceStateError("machine snapshot: wrong fields")
        if not isinstance(raw["cpus"], list) or not isinstance(raw["devices"], dict):
            raise DeviceStateError("machine snapshot: malformed cpus or devices")
        return cls(dict(raw["fingerprint"]), [state_from_dict(c) for c in raw["cpus"]], dict(raw["devices"]))


class Machine:
    """A q35 (x86_64) or virt (aarch64) machine on one backend."""

    def __init__(self, config: VmConfig, backend: Backend, console: OutputSink,
                 memory: GuestMemory | None = None) -> None:
        self.config = config
        self.arch: Arch = config.arch
        self.backend = backend
        self.console = console
        self.board = board_for(config)
        self.memory = memory if memory is not None else GuestMemory(self.board.ram_regions(config))
        self.pio = Bus("port")
        self.mmio = Bus("mmio")
        self._run = RunStateTracker()            # run state + the big lock (devices and run state)
        self._lock = self._run.lock
        self.listeners: list[Callable[[str, dict[str, Any] | None], None]] = []
        self.kernel_image: bytes | None = None
        self.initrd_image: bytes | None = None
        self.exit_error: str | None = None
        self.vcpus: list[Vcpu] = []
        self.device_manager = DeviceManager(self._run, config, self.memory, self.pio, self.mmio)
        self._guest = GuestPowerRequests(self.request_shutdown, self.system_reset)
        wiring = self.board.build(BoardContext(config, self.memory, console, self.pio, self.mmio,
                                               self.device_manager, self._run, self._kick_vcpu, self._guest,
                                               self.system_reset))
        # q35: LAPICs, IOAPIC, clock; virt: GICv3, timers, clock
        self.interrupts: InterruptController | GicController = wiring.interrupts
        try:
            self.vm = backend.open_vm(self.arch, self.memory, wiring.mmio_windows)
            self.vcpus.extend(self.vm.create_vcpu(i) for i in range(config.smp))
            self.power = VcpuPower(self.arch, self._run, self.memory, self.vcpus)
            self.board.attach_vcpus(self.vcpus, self.power)
        except BaseException:
            self.device_manager.close()
            raise
        self.runner = VcpuRunner(self._run, self.vcpus, self.power, self.interrupts, self, self._guest,
                                 self.request_shutdown, self._internal_error)

    # -- parts, as callers see them --------------------------------------------------------
    @property
    def devices(self) -> dict[str, DeviceSlot]:
        """Every saved device by name (board devices, then PCI), in reset order."""
        return self.device_manager.devices

    @property
    def pci(self) -> PciSetup:
        assert self.device_manager.pci is not None
        return self.device_manager.pci

    @property
    def intx_lines(self) -> dict[int, SharedLine]:
        """GSI (q35) or INTID (virt) -> wire-OR of the PCI functions' INTx."""
        return self.device_manager.intx_lines

    def _kick_vcpu(self, index: int) -> None:
        self.vcpus[index].kick()

    def _internal_error(self, message: str) -> None:
        with self._lock:
            self.exit_error = message

    # -- hot-plug (QMP device_add / device_del) ----------------------------------------
    def hotplug_device(self, device: DeviceConfig) -> DeviceSlot:
        """Plug a virtio-blk-pci or virtio-net-pci function for ``device`` while the
        machine exists.

        Its drive (netdev) must be a ``-drive`` (``-netdev``) of the command line that no
        device uses; the image is opened and locked (the socket/tap opened) here. Under the
        big lock the function is put on its bus: on pcie.0 the guest sees it on its next
        configuration-space scan; behind a ``pcie-root-port`` the port's ``plug``
        raises its slot events (Presence Detect / DLL State Changed) and hot-plug
        interrupt, so a pciehp guest notices at once. The function is wired to the interrupt
        controller (q35: LAPICs/IOAPIC; virt: GICv2m/SPIs), and added to :attr:`devices`, so
        it is saved, reset and in the migration fingerprint. Raises :class:`MachineError`
        naming the problem; on error nothing has changed.
        """
        return self.device_manager.hotplug(device)

    def hotunplug_device(self, device_id: str) -> DeviceSlot:
        """Remove PCI device ``device_id`` (hot-plugged or from the command line).

        Under the big lock: its interrupt is lowered, the function leaves its bus (its
        configuration space reads as all ones), a NIC stops delivering, and it leaves
        :attr:`devices`; behind a root port, the port's ``unplug`` raises the slot
        events and interrupt (surprise removal: nothing waits for the guest). Root ports
        themselves cannot be unplugged. Then, outside the lock (a NIC's reader thread may be
        waiting for it), its image is closed and unlocked or its netdev closed. Raises
        :class:`MachineError`; on error nothing changed.
        """
        return self.device_manager.hotunplug(device_id)

    # -- vCPU power: PSCI (virt), INIT/SIPI (q35) ------------------------------------------
    def power_state(self, index: int) -> str:
        """vCPU ``index``'s power state: "on", "off" (virt) or "wait-for-sipi" (q35)."""
        return self.power.state(index)

    def psci_cpu_on(self, target_mpidr: int, entry: int, context_id: int) -> int:
        """PSCI CPU_ON (see :meth:`VcpuPower.psci_cpu_on`); a PSCI return code."""
        return self.power.psci_cpu_on(target_mpidr, entry, context_id)

    def psci_affinity_info(self, target_mpidr: int, lowest_level: int) -> int:
        """PSCI AFFINITY_INFO at level 0: 0 (ON) or 1 (OFF), or INVALID_PARAMETERS."""
        return self.power.psci_affinity_info(target_mpidr, lowest_level)

    def fingerprint(self, source: dict[str, Any] | None = None) -> dict[str, Any]:
        """What must be equal on both ends of a migration (the stream's CONFIG shape).
        With ``source`` (an incoming stream's fingerprint), legacy devices that the source
        lacks (an older hv) are left out: they keep their reset state (see restore)."""
        out: dict[str, Any] = {
            "arch": self.arch.value,
            "machine": self.board.name,
            "vcpus": self.config.smp,
            "memory": self.memory.size,
            "devices": self.device_manager.describe(source),
        }
        if self.vm.tsc_hz is not None:   # x86: the guest's TSC rate (stream format 1.4)
            out["tsc_hz"] = self.vm.tsc_hz
        return out

    def adopt_tsc_hz(self, tsc_hz: int | None) -> None:
        """Run the guest's TSC at the rate it had at the source (an incoming stream's or a
        snapshot's ``tsc_hz``), before the vCPUs run: a guest calibrates its TSC once, at
        boot. Raises :class:`MachineError` with the backend's reason when it cannot run
        that rate (KVM without TSC scaling, another host rate); then nothing changed.

        None: a stream older than format 1.4, which did not say. Its source is assumed to
        have run hv's 1 GHz, the rate of every older hv's Unicorn VMs and TSC-scaling KVM
        VMs; a VM that cannot run 1 GHz (KVM without TSC scaling, whose older source ran
        the host's rate like this one) keeps its own rate, as older hv did."""
        if tsc_hz is None:
            if self.vm.tsc_hz is not None:
                self._assume_legacy_tsc_rate()
            return
        if tsc_hz == self.vm.tsc_hz:
            return
        try:
            self.vm.set_tsc_hz(tsc_hz)
        except BackendError as exc:
            raise MachineError(f"cannot run the guest's TSC at its rate: {exc}") from None
        log.info("the guest's TSC runs at the source's %d Hz", tsc_hz)

    def _assume_legacy_tsc_rate(self) -> None:
        """adopt_tsc_hz(None): 1 GHz where this VM can run it, else its own rate (logged)."""
        try:
            if self.vm.tsc_hz != LEGACY_TSC_HZ:
                self.vm.set_tsc_hz(LEGACY_TSC_HZ)
            log.info("the source did not say its guest TSC rate (a stream older than format 1.4): "
                     "assuming hv's former %d Hz", LEGACY_TSC_HZ)
        except BackendError as exc:
            log.warning("the source did not say its guest TSC rate (a stream older than format 1.4) and "
                        "this VM cannot run hv's former %d Hz (%s): the guest's TSC runs at this VM's %s Hz",
                        LEGACY_TSC_HZ, exc, self.vm.tsc_hz)

    # -- IoHandler (called from vCPU threads) ----------------------------------------
    def pio_read(self, port: int, size: int) -> int:
        with self._lock:
            return self.pio.read(port, size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        with self._lock:
            self.pio.write(port, size, value)

    def mmio_read(self, addr: int, size: int) -> int:
        with self._lock:
            return self.mmio.read(addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        with self._lock:
            self.mmio.write(addr, size, value)

    # -- events ---------------------------------------------------------------------
    def add_listener(self, listener: Callable[[str, dict[str, Any] | None], None]) -> None:
        self.listeners.append(listener)

    def _emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, data)
            except Exception:  # a broken listener must not take the VM down
                log.exception("event listener failed for %s", event)

    # -- boot -------------------------------------------------------------------------
    def load_kernel(self, image: bytes, initrd: bytes | None = None) -> None:
        """Let the board's firmware load ``image`` (and ``initrd``); vCPU 0 starts there,
        the others are off / wait for SIPI."""
        boot = self.board.setup_boot(self.memory, self.config, image, initrd)
        self.kernel_image = image
        self.initrd_image = initrd
        self.vcpus[0].set_state(boot.cpu_state)
        self.power.reset()

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        return self._run.state

    @property
    def running(self) -> bool:
        return self._run.running

    def require_state(self, command: str, *allowed: RunState, message: str = NOT_POSSIBLE) -> RunState:
        """Raise :class:`MachineError` (QMP: GenericError) unless the run state is one of
        ``allowed``; ``message`` may use ``{command}`` and ``{state}``."""
        return self._run.require(command, *allowed, message=message)

    def set_state(self, state: RunState) -> None:
        """Set a non-running state label (inmigrate, postmigrate) on a stopped machine.

        A machine marked ``inmigrate`` (an incoming migration's or snapshot's destination)
        gets its vCPU threads at once, parked (:meth:`prepare_vcpus`)."""
        with self._lock:
            if self.state is RunState.RUNNING:
                raise MachineError(f"cannot mark a running machine {state.value}")
            if self.state is RunState.SHUTDOWN and state is not RunState.POSTMIGRATE:
                return   # shut down (e.g. a signal) before the label was set: stays down
            self._run.set(state)
            if state is RunState.INMIGRATE:
                self.prepare_vcpus()

    def prepare_vcpus(self) -> None:
        """Create the vCPU threads now, parked, without starting the machine (its run
        state does not change; ``inmigrate`` stays ``inmigrate``), so that :meth:`start`
        (an incoming migration's commit) only lets them run: creating a thread there cost
        the guest up to ~100 ms of downtime on a loaded host. Idempotent; nothing once the
        machine is closing or has shut down. :meth:`close` joins them as ever."""
        with self._lock:
            if self._run.closing or self.state is RunState.SHUTDOWN:
                return
            self.runner.prepare()

    def start(self, paused: bool = False, paused_state: RunState = RunState.PAUSED) -> None:
        """Start the machine: its vCPU threads (created now unless :meth:`prepare_vcpus`
        made them) run at once unless ``paused``, in which case the machine waits in
        ``paused_state`` (``prelaunch`` for ``-S``) for :meth:`resume`."""
        with self._lock:
            if self.runner.started:
                raise MachineError("machine already started")
            if self.state is RunState.SHUTDOWN:
                paused = True   # shut down (e.g. a signal) before it started: stays down
            else:
                self._run.set(paused_state if paused else RunState.RUNNING)
            self.runner.start()
        if not paused:
            self._emit("RESUME")

    def pause(self) -> bool:
        """Stop every vCPU at an architectural point; True if it was running."""
        with self._lock:
            if self.state is not RunState.RUNNING:
                return False
            self._run.set(RunState.PAUSED)
        self.runner.kick_all()
        self.runner.wait_parked()
        self._emit("STOP")
        return True

    def resume(self) -> bool:
        """Let the vCPUs run again; True if the machine was stopped."""
        with self._lock:
            if self.state is RunState.RUNNING:
                return False
            if self.state is RunState.SHUTDOWN:
                raise MachineError("the guest has shut down")
            if not self.runner.started:
                raise MachineError("machine has not been started")
            self._run.set(RunState.RUNNING)
        self._emit("RESUME")
        return True

    def console_input(self, data: bytes) -> int:
        """Host console bytes into the UART (hv/console_input.py); how many it took: 0
        while an incoming migration has not arrived (restoring it would drop them)."""
        with self._lock:
            uart = self.devices.get("serial0") or self.devices.get("pl011")
            if uart is None or self.state in (RunState.INMIGRATE, RunState.SHUTDOWN):
                return 0
            return uart.device.enqueue_input(data)  # type: ignore[attr-defined]

    def request_shutdown(self, reason: str) -> None:
        """End the machine (guest power-off, quit, signal); idempotent."""
        if not self._run.shut_down(reason):
            return
        self.runner.kick_all()
        try:
            self._emit("SHUTDOWN", {"guest": reason == "guest-shutdown", "reason": reason})
        finally:
            self._run.announce_shutdown()   # only now may hv end and close the QMP server

    def wait_shutdown(self, timeout: float | None = None) -> str | None:
        """Block until the machine shuts down; the reason, or None on timeout."""
        return self._run.wait_shutdown(timeout)

    def system_reset(self, reason: str = "host-qmp-system-reset") -> None:
        """Reset devices and vCPUs and reload the kernel, as a reset button would;
        ``reason`` goes into the RESET event ("guest-reset": the guest asked)."""
        was_running = self.pause()
        with self._lock:
            self.device_manager.reset()
            if self.kernel_image is not None:
                self.load_kernel(self.kernel_image, self.initrd_image)
        self._emit("RESET", {"guest": reason.startswith("guest"), "reason": reason})
        if was_running:
            self.resume()

    def close(self) -> None:
        """Stop the vCPU threads and release the backend VM and RAM."""
        with self._lock:
            self._run.closing = True
            self.runner.set_throttle(0)
            if self.state is RunState.RUNNING:
                self._run.set(RunState.PAUSED)
            self._run.changed.notify_all()
        self.runner.stop()
        self.vm.close()
        self.memory.close()
        self.device_manager.close()

    # -- throttling (migration auto-converge) ---------------------------------------------
    def set_throttle(self, percent: int) -> None:
        """Keep the vCPUs off the CPU ``percent``% of the time (0 turns it off); see
        :meth:`VcpuRunner.set_throttle`."""
        self.runner.set_throttle(percent)

    @property
    def throttle_percent(self) -> int:
        return self.runner.throttle_percent

    def vcpu_thread_ids(self) -> list[int]:
        """Host thread ids of the vCPU threads (0 before they exist)."""
        return self.runner.thread_ids()

    # -- snapshots ------------------------------------------------------------------------
    def save(self) -> MachineSnapshot:
        """Capture CPU and device state; the machine must not be running."""
        with self._lock:
            if self.state is RunState.RUNNING:
                raise MachineError("pause the machine before saving it")
            cpus = self.power.capture()
            devices = self.device_manager.save()
        return MachineSnapshot(self.fingerprint(), cpus, devices)

    def restore(self, snapshot: MachineSnapshot) -> None:
        """Load CPU and device state captured by :meth:`save` (on any backend).

        Everything is validated first; on error nothing has been changed.
        """
        self.power.check(snapshot.cpus)
        device_states, absent = self.device_manager.check_states(snapshot.devices)
        with self._lock:
            if self.state is RunState.RUNNING:
                raise MachineError("cannot restore into a running machine")
            if "tsc_hz" in snapshot.fingerprint:   # an in-process move's source rate
                self.adopt_tsc_hz(snapshot.fingerprint["tsc_hz"])
            self.device_manager.load(device_states, absent)
            self.power.load(snapshot.cpus)


def ram_layout(config: VmConfig) -> list[RegionSpec]:
    """Where ``config``'s board puts its RAM."""
    return board_for(config).ram_regions(config)
