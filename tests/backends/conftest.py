"""The backend tests' guest harnesses live in modules of this package, one per backend and
architecture, so that tests elsewhere (tests/boot runs a kernel entry on the Unicorn x86 guest)
can import them without importing a test module:

- :mod:`tests.backends.unicorn_x86_guest`: ``X86Guest``, ``RecordingIo``, ``assemble_x86``;
- :mod:`tests.backends.unicorn_arm64_guest`: ``Arm64Guest`` and its memory map;
- :mod:`tests.backends.kvm_x86_guest`: GNU-as guests and entry states on real KVM.

Each test module keeps its own ``guest``/``vm`` fixture: they differ per backend."""
