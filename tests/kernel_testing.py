"""What the kernel test files share: the device, `rlhf_kernels` imported with Triton's interpreter on
when there is no GPU, the skip markers, and per-test random generators.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors, which needs
TRITON_INTERPRET=1 before triton is first imported and while the kernels run. tests/conftest.py
sets it for the session and, for each test, while it runs; this module also sets it around its own
import of `rlhf_kernels` (restoring the previous value), so the kernels are interpreted whatever the
environment said at start. With a GPU the same tests run the compiled kernels."""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
_saved_interpret = os.environ.get("TRITON_INTERPRET")
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
import rlhf_kernels  # noqa: E402

if _saved_interpret is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _saved_interpret

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _why_triton_cannot_run() -> str | None:
    if not rlhf_kernels.TRITON_AVAILABLE:
        return "triton is not installed"
    if HAS_CUDA:
        return None
    if not rlhf_kernels.TRITON_INTERPRETED:
        return "no GPU, and rlhf_kernels was imported before TRITON_INTERPRET=1 was set"
    import numpy
    import triton

    def version(module):
        return tuple(int(part) for part in module.__version__.split(".")[:2])

    if version(triton) < (3, 7) and version(numpy) >= (2, 4):  # the interpreter's tensor.__index__ is int(1-element array)
        return (f"Triton {triton.__version__}'s interpreter fails on NumPy {numpy.__version__} (int() of a 1-element "
                "array, refused since NumPy 2.4): use triton >= 3.7 or numpy < 2.4 to run the kernels on a CPU")
    return None


WHY_TRITON_CANNOT_RUN = _why_triton_cannot_run()
TRITON_RUNNABLE = WHY_TRITON_CANNOT_RUN is None
TRITON_SKIP_REASON = f"Triton kernels cannot run here: {WHY_TRITON_CANNOT_RUN}"
needs_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason=TRITON_SKIP_REASON)


def skip_if_triton_cannot_run(impl: str):
    """In a test parametrized over impl ("triton" or "torch"): skip the Triton case where it cannot run."""
    if impl == "triton" and not TRITON_RUNNABLE:
        pytest.skip(TRITON_SKIP_REASON)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="bf16 tl.dot is wrong in Triton's interpreter; bf16 is tested on a GPU")


def rng_for(request):
    """A generator seeded from the test's name (KERNELS_TEST_SEED shifts every seed)."""
    seed = zlib.crc32(request.node.name.encode()) + int(os.environ.get("KERNELS_TEST_SEED", "0"))
    return torch.Generator().manual_seed(seed)


def draw(gen, low, high):
    """Random int in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=gen))
