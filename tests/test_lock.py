"""requirements.lock pins every package pyproject names, so `make` installs a known set."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_lock_pins_every_dependency_and_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for requirements in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in requirements}
    wanted.discard("fct")  # the test extra names the others as fct[...]
    pinned = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[name.lower().replace("_", "-")] = version
    missing = sorted(wanted - set(pinned))
    assert not missing, f"not in requirements.lock (run `make lock`): {missing}"
    assert pinned["torch"] and pinned["torchvision"]
