"""pyproject lists every package folder, so a normal (non-editable) install ships all of them."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"core": "flowcoach.core", "domains": "flowcoach.domains", "rewards": "flowcoach.rewards"}


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"


def test_shipped_base_folders_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]
    # every shipped base (a folder with model.safetensors: base, base-wide, ...), or a wheel install lacks it
    for weights in (ROOT / "domains").glob("*/*/model.safetensors"):
        base = weights.parent
        package = f"flowcoach.domains.{base.parent.name}"
        assert f"{base.name}/*" in data.get(package, []), f"add '{base.name}/*' to package-data of '{package}'"
