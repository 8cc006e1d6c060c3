"""The tested set (constraints.txt, what `make install` installs) and the ranges setup.cfg declares
(what `pip install relvid` accepts in an existing environment) agree: every dependency is pinned,
and every pin lies in its range."""

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():
        lines += extra.splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_is_pinned_inside_its_range():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue  # the Makefile pins torch (TORCH_VERSION): a CPU or a CUDA build
        assert name in pins, f"{req.name} is required by setup.cfg but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside setup.cfg's {req.specifier}"


def test_the_makefile_pins_torch_inside_its_range():
    torch = next(r for r in _requirements() if canonicalize_name(r.name) == "torch")
    version = next(line.split(":=")[1].strip() for line in (REPO / "Makefile").read_text().splitlines()
                   if line.startswith("TORCH_VERSION"))
    assert torch.specifier.contains(version)
