"""Loading the scripts of experiments/toy/ (not a package) as modules, for their tests."""

import importlib.util
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments" / "toy"


def load_script(name: str) -> ModuleType:
    """experiments/toy/<name>.py, imported afresh."""
    spec = importlib.util.spec_from_file_location(f"toy_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
