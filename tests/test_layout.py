"""Our top-level modules must not share a name with an installed distribution's.

The scripts run from the repository root, which Python puts first on sys.path, so a module of ours
named like an installed package shadows that package in every process that imports both. That broke
every parity test when transformers 5.25 began to require and import Hugging Face's `kernels`, the
name our Triton package then had (now `rlhf_kernels`)."""

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def our_top_level_names():
    """Modules and packages importable from the repository root and from tests/ (pytest puts it on sys.path)."""
    names = {path.stem for folder in (ROOT, ROOT / "tests") for path in folder.glob("*.py")}
    names |= {path.parent.name for path in ROOT.glob("*/__init__.py")}
    return names - {"conftest"}


def test_no_module_of_ours_shadows_an_installed_package():
    names = our_top_level_names()
    assert {"model", "rlhf_kernels", "data", "sft", "released"} <= names  # the listing itself works
    installed = importlib.metadata.packages_distributions()
    assert "transformers" in installed  # the test environment is the one that imports both
    shadowed = {name: installed[name] for name in sorted(names) if name in installed}
    assert not shadowed, f"modules of ours shadow installed packages (module: distributions): {shadowed}"
