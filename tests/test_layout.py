"""The package's shape: imports point one way, the toy world stays behind the component registry,
command-line files only parse and call, and the configs an installed relvid needs ship with it."""

from __future__ import annotations

import ast
import filecmp
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("relvid", "experiments")  # tests are left out: they may reach into anything

# Who may import relvid.toy (the toy world's pure parts and its drivers alike).
TOY_IMPORTERS = ("relvid.toy", "relvid.components", "relvid.commands.toy", "experiments.toy")
# The toy world's pure parts: they know nothing of training, sampling or the drivers.
TOY_PURE = ("relvid.toy.world", "relvid.toy.render", "relvid.toy.judge", "relvid.toy.codec", "relvid.toy.text")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the scanned folders."""
    modules = {}
    for top in SCANNED:
        for path in (REPO / top).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name an import statement of the file asks for, wherever it stands (inside
    functions too); ``from a import b`` gives both ``a`` and ``a.b``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """File-level graph: module -> the modules of this repository it imports."""
    modules = module_files()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = {owner(name) for name in _imported_names(path, module)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from relvid.models import codecs\n    import relvid.toy.codec as c\n")
    assert {"relvid.models", "relvid.models.codecs", "relvid.toy.codec"} <= _imported_names(lazy, "x.lazy")


def test_the_file_level_import_graph_is_acyclic():
    graph = import_graph()
    assert "relvid.components" in graph and "relvid.training.module" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _package(module: str) -> str:
    """relvid.<package> (relvid.toy.drivers on its own: the drivers sit above the core, the pure
    toy parts below components.py) or the experiments folder."""
    parts = module.split(".")
    if parts[:3] == ["relvid", "toy", "drivers"]:
        return "relvid.toy.drivers"
    return ".".join(parts[:2])


def test_the_package_level_graph_is_acyclic():
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        source = _package(module)
        graph.setdefault(source, set()).update(_package(t) for t in targets if _package(t) != source)
    cycle = find_cycle(graph)
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_only_the_registry_the_toy_package_and_the_toy_commands_import_the_toy_world():
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items() for target in targets
        if target.startswith("relvid.toy") and not module.startswith(TOY_IMPORTERS)
    )
    assert offenders == []


def test_the_toy_worlds_pure_parts_import_no_drivers_and_nothing_that_trains_or_samples():
    allowed = ("relvid.toy.", "relvid.models.codecs", "relvid.seeding")
    graph = import_graph()
    for module in TOY_PURE:
        assert module in graph
        assert sorted(t for t in graph[module] if not t.startswith(allowed) or t.startswith("relvid.toy.drivers")) == []


def test_core_packages_import_upward_never():
    """losses and models know nothing of data, training, inference, evaluation or the commands."""
    upper = ("relvid.data", "relvid.preprocess", "relvid.training", "relvid.inference", "relvid.eval",
             "relvid.commands", "relvid.cli", "relvid.toy")
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith(("relvid.losses", "relvid.models", "relvid.data")):
            bad = sorted(t for t in targets if t.startswith(upper) and not t.startswith("relvid.data"))
            assert bad == [], f"{module} imports {bad}"


@pytest.mark.parametrize("name", ["cli", "commands"])
def test_command_line_files_import_no_module_of_their_own_by_string(name):
    paths = [REPO / "relvid" / "cli.py"] if name == "cli" else sorted((REPO / "relvid" / "commands").glob("*.py"))
    for path in paths:
        text = path.read_text(encoding="utf-8")
        assert "import_module" not in text and "importlib" not in text, path


def test_every_package_folder_is_a_regular_package():
    """`pip install .` (find_packages) skips folders without __init__.py: their modules would be missing."""
    for folder in (REPO / "relvid").rglob("*"):
        if folder.is_dir() and any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), folder


@pytest.mark.parametrize("sub", ["relations", "toy"])
def test_the_repository_configs_are_the_shipped_ones(sub):
    from relvid.config import SHIPPED_CONFIGS

    shipped, repo = SHIPPED_CONFIGS / sub, REPO / "configs" / sub
    assert shipped.is_dir() and repo.is_dir()
    names = sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml"))
    assert names and names == sorted(p.relative_to(repo) for p in repo.rglob("*.yaml"))
    assert all(filecmp.cmp(shipped / n, repo / n, shallow=False) for n in names)


# --- the test suite's own shape ------------------------------------------------------------------

TESTS = REPO / "tests"


def imported_test_modules(path: Path) -> list[str]:
    """The modules named ``test_*`` that a file imports (absolute or relative, wherever the import
    stands): shared helpers belong in tests/helpers or a conftest.py, not in a test module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.rpartition(".")[2].startswith("test_")]
        elif isinstance(node, ast.ImportFrom):
            if node.module and node.module.rpartition(".")[2].startswith("test_"):
                found.append(node.module)
            found += [alias.name for alias in node.names if alias.name.startswith("test_")]
    return found


def test_the_test_import_finder_sees_every_form(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text("import tests.test_cli\nfrom tests.data.test_cache import make_record\n"
                     "def f():\n    from .test_module import tiny_cfg\n    from tests.eval import test_api_judge\n"
                     "from tests.helpers.configs import tiny_cfg\nimport pytest\n")
    assert sorted(imported_test_modules(probe)) == ["test_api_judge", "test_module", "tests.data.test_cache",
                                                     "tests.test_cli"]


def test_no_test_module_imports_another():
    files = sorted(TESTS.rglob("test_*.py"))
    assert len(files) > 40 and TESTS / "test_layout.py" in files
    offenders = {str(p.relative_to(REPO)): names for p in files if (names := imported_test_modules(p))}
    assert offenders == {}
