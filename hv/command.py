"""The ``hv`` command: its subcommands (``hv qmp``, ``hv migrate``, ``hv bench``) or the
launcher (:func:`hv.cli.main`).

The subcommands are dispatched before the launcher's modules are imported: those bring in
every board, device, backend and the migration engine (0.25 s here with cached bytecode),
which a QMP command typed at a terminal does not need (``hv qmp --help``: 0.43 -> 0.13 s).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["qmp"]:
        from hv.qmp.client import main as qmp_main  # noqa: PLC0415 - only what the subcommand needs

        return qmp_main(args[1:], prog="hv qmp")
    if args[:1] == ["bench"]:
        from hv.bench import main as bench_main  # noqa: PLC0415

        return bench_main(args[1:])
    if args[:1] == ["migrate"]:
        from hv.migrate_cli import main as migrate_main  # noqa: PLC0415

        return migrate_main(args[1:])
    from hv.cli import main as launcher_main  # noqa: PLC0415

    return launcher_main(args)
