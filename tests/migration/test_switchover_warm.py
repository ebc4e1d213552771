"""One-time costs kept out of a migration's switch-over.

A fresh ``hv -incoming`` process never loaded a kernel, so its first vCPU state it writes
is the migrated one: in ABI mode cffi parses each C type string (pycparser) the first time
it meets one, and four of them in ``write_state`` cost 1.6 ms of a 2.3 ms restore, inside
the guest's downtime. The source's first save and dirty-log take paid the same. The KVM
modules parse their strings at import (``hv_backends.kvm_abi.preparse``); this checks, in
a fresh interpreter (an already warm one would pass whatever the modules do), that a
save, a restore and the dirty-log calls of a migration parse nothing new.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.helpers import FIXTURES, requires_kvm

SCRIPT = textwrap.dedent("""
    import json, sys
    from hv.config import parse_args
    from hv.console import BufferSink
    from hv.machine import Machine
    from hv_backends import backend_class
    from hv_backends.kvm_abi import ffi

    config = parse_args(["-machine", "q35", "-m", "16", "-kernel", sys.argv[1]]).config
    machine = Machine(config, backend_class("kvm")(), BufferSink())  # as -incoming: no kernel loaded
    try:
        before = set(ffi._parsed_types)
        machine.restore(machine.save())
        vm = machine.vm
        vm.start_dirty_log_deferred()
        vm.arm_dirty(0, 64)
        vm.take_dirty_deferred()
        vm.stop_dirty_log()
        print(json.dumps(sorted(str(key) for key in set(ffi._parsed_types) - before)))
    finally:
        machine.close()
""")


@requires_kvm
def test_kvm_save_restore_and_dirty_log_parse_no_type_strings() -> None:
    kernel = FIXTURES / "x86_64" / "dirty.elf"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(kernel)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    parsed_late = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed_late == [], f"type strings first parsed during the migration path: {parsed_late}"
