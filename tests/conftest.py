from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.helpers import HvProcess


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[Callable[..., HvProcess]]:
    """Start ``hv`` processes; every one is terminated and reaped at teardown."""
    started: list[HvProcess] = []

    def start(*args: str, name: str = "hv", typed: bool = False) -> HvProcess:
        process = HvProcess(tmp_path, *args, name=name, typed=typed)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()
