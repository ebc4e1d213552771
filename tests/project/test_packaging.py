"""The installed distribution carries every package of the checkout.

pyproject.toml lists packages by hand (the card's folders backends/ and fixtures/ install
under the import names hv_backends and hv_fixtures, which setuptools' automatic discovery
cannot express), so a new package folder must be added there: this test says which one is
missing, instead of a non-editable install failing at import time on a user's machine.
"""
from __future__ import annotations

import tomllib

from tests.helpers import ROOT

IMPORT_NAMES = {"hv": "hv", "backends": "hv_backends", "fixtures": "hv_fixtures"}


def _checkout_packages() -> set[str]:
    found = set()
    for folder, name in IMPORT_NAMES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    return found


def test_every_package_folder_is_installed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    missing = sorted(_checkout_packages() - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_mapped_folders_match_import_names() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["package-dir"] == {"hv_backends": "backends", "hv_fixtures": "fixtures"}
