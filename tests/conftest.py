"""Test-session setup and shared fixtures. Runs before any test module imports `rlhf_kernels`.

Without a GPU, Triton's kernels can only run in its interpreter, which must be switched on before
triton is first imported (TRITON_INTERPRET=1). The interpreter is slow, so every test that does not
exercise a kernel itself runs the PyTorch paths (KERNELS=torch); the kernel tests call the
`*_triton` functions directly, and tests that want the dispatcher's choice set KERNELS=auto."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KERNELS", "torch")


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """Keep the interpreter on while each test runs (a test may have changed the variable)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """The default synthetic task (seed 0), generated once per test session (about 2 s)."""
    from data.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "seed0", seed=0)


# pytest.ini runs the suite on `-n auto` workers (pytest-xdist). Each worker's torch already uses every
# core and many tests start 2-rank torchrun jobs, so more than 4 workers only oversubscribe the machine
# (a GPU node's 16 cores would otherwise mean 16 processes on one GPU). On CI's 2 cores: 2 workers,
# the suite in 12.6-13.5 minutes instead of 20.4 (with the longest test first; 15.5 without).
def pytest_xdist_auto_num_workers(config):
    return min(os.cpu_count() or 1, 4)


# The longest test goes first, so that the other workers share the rest while it runs rather than
# leaving it alone at the end (worksteal hands out tests in collection order).
LONGEST_FIRST = ("tests/test_stages.py::test_embedded_task_quality",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid not in LONGEST_FIRST)


# The references the tests compare against come unpinned from the package registry, so a new release can
# turn CI red overnight (transformers 5.25 did, by importing Hugging Face's `kernels`): the header names them.
REFERENCES = ("torch", "triton", "transformers", "tokenizers", "sentencepiece", "huggingface_hub", "safetensors", "kernels")


def pytest_report_header(config):
    import importlib.metadata

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"
    return "versions: " + ", ".join(f"{name} {version(name)}" for name in REFERENCES)
