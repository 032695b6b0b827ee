"""Our top-level modules must not share a name with a package we depend on; and the install on a laptop.

The scripts run from the repository root, which Python puts first on sys.path, so a module of ours
named like an installed package shadows that package in every process that imports both. That broke
every parity test when transformers 5.25 began to require and import Hugging Face's `kernels`, the
name our Triton package then had (now `rlhf_kernels`)."""

import importlib.metadata
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def our_top_level_names():
    """Modules and packages importable from the repository root and from tests/ (pytest puts it on sys.path)."""
    names = {path.stem for folder in (ROOT, ROOT / "tests") for path in folder.glob("*.py")}
    names |= {path.parent.name for path in ROOT.glob("*/__init__.py")}
    return names - {"conftest"}


def requirements(*files) -> list:
    """The requirement lines of our requirement files (comments and `-r` includes left out), parsed."""
    from packaging.requirements import Requirement

    lines = [line.split("#")[0].strip() for name in files for line in (ROOT / name).read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("-r")]


def installed_dependencies() -> set[str]:
    """The distributions our requirement files pull in, with everything they require in turn (as installed
    here): what a test process may import. Other packages in a user's environment are none of our business."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = requirements("requirements.txt", "requirements-dev.txt")
    seen = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        try:
            todo += [Requirement(text) for text in importlib.metadata.requires(requirement.name) or []]
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
    return seen


def test_no_module_of_ours_shadows_a_package_we_depend_on():
    from packaging.utils import canonicalize_name

    names = our_top_level_names()
    assert {"model", "rlhf_kernels", "data", "sft", "released"} <= names  # the listing itself works
    dependencies = installed_dependencies()
    assert {"torch", "tokenizers", "huggingface-hub"} <= dependencies  # requirements.txt's, found
    if importlib.util.find_spec("transformers") is not None:  # requirements-dev's (and kernels, from transformers 5.25)
        assert "transformers" in dependencies
    modules = importlib.metadata.packages_distributions()
    shadowed = {name: modules[name] for name in sorted(names) if name in modules
                and any(canonicalize_name(d) in dependencies for d in modules[name])}
    assert not shadowed, f"modules of ours shadow packages the tests import (module: distributions): {shadowed}"


def test_a_laptop_without_triton_installs_and_runs_the_pytorch_paths(tmp_path):
    # Triton ships wheels for Linux only: pinned unconditionally, `pip install -r requirements.txt` failed on a
    # Mac before anything ran. Its marker leaves it out there, and every stage imports and the model runs without it.
    import subprocess
    import sys

    runtime = {r.name: r for r in requirements("requirements.txt")}
    on = {system: {name for name, r in runtime.items() if r.marker is None or r.marker.evaluate(
        {"platform_system": system, "sys_platform": system.lower()})} for system in ("Linux", "Darwin", "Windows")}
    assert "triton" in on["Linux"] and "torch" in on["Darwin"]
    assert on["Darwin"] == on["Windows"] == on["Linux"] - {"triton"}
    code = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError, as where it is not installed
import torch
import rlhf_kernels, model, sft, train_score, ppo_lag, evaluate, pipeline, rounds
assert not rlhf_kernels.TRITON_AVAILABLE
args = model.ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, hidden_dim=64)
net = model.Transformer(args)
net.init_weights()
ids = torch.randint(3, 64, (2, 5))
logits = net(ids)
assert logits.shape == (2, 5, 64) and torch.isfinite(logits).all()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
