"""The Triton kernels compile for the GPUs users run, checked on a CPU: bench/compile_kernels.py compiles
every autotune config of every kernel for sm_90 (H100/H200) through the kernels' real entry points, with
Triton's own ptxas, and reads each cubin's registers, spills and shared memory. The other kernel tests run
Triton's interpreter, which compiles nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no CUDA backend (ptxas) to compile with")

# Every kernel of rlhf_kernels: a launch that stopped being reached, or a kernel added without a
# launch here, fails the first test.
KERNELS = {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
           "_logits_logprob_fwd_kernel", "_logits_logprob_bwd_kernel", "_linear_logprob_fwd_kernel",
           "_linear_logprob_grad_logits_kernel"}


def compile_env():
    """This environment without what makes Triton interpret (tests/conftest.py sets TRITON_INTERPRET=1)."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KERNELS", "KERNELS_AUTOTUNE")}


@pytest.mark.slow
def test_every_kernel_and_autotune_config_compiles_for_hopper_in_bf16(tmp_path):
    out = tmp_path / "compiled.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_kernels.py"), "--arch", "90",
                           "--dtypes", "bfloat16", "--head-dims", "128", "--causal-only", "--json", str(out)],
                          env=compile_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "TRITON_DEFAULT_FP_FUSION is unset" not in proc.stderr  # Triton 3.9's warning: every launch says it
    report = json.loads(out.read_text())
    assert report["failures"] == []
    rows = report["rows"]
    assert {row["kernel"] for row in rows} == KERNELS
    # Every autotune config, not only the first (the delta kernel has none); the grad-logits kernel twice
    # per config (with and without the entropy's gradient); every variant within an H100's shared memory.
    count = {name: sum(row["kernel"] == name for row in rows) for name in KERNELS}
    assert count.pop("_attn_bwd_delta_kernel") == 1 and min(count.values()) > 1, count
    assert count["_linear_logprob_grad_logits_kernel"] == 2 * count["_linear_logprob_fwd_kernel"]
    assert report["shared_limit"] == 232448
    for row in rows:
        assert row["shared"] <= report["shared_limit"] and row["registers"] > 0, row


def test_a_kernel_the_target_gpu_cannot_run_is_reported(tmp_path):
    """An fp8 (e4m3) matrix product: Hopper has it, an A100 does not. Each architecture in its own process
    (a kernel keeps the target it first compiled for)."""
    script = """
import sys, torch, triton, triton.language as tl
sys.path.insert(0, sys.argv[1])
from compile_kernels import offline_compilation

@triton.jit
def fp8_dot(A, B, C, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tile = r[:, None] * BLOCK + r[None, :]
    tl.store(C + tile, tl.dot(tl.load(A + tile), tl.load(B + tile)))

with offline_compilation(int(sys.argv[2])) as (compiled, failures):
    a = torch.zeros(32, 32, dtype=torch.float8_e4m3fn)
    fp8_dot[(1,)](a, a, torch.empty(32, 32), BLOCK=32)
print(len(compiled), *[f["kernel"] + ": " + f["error"] for f in failures], sep="\\n")
"""
    (tmp_path / "fp8_dot.py").write_text(script)  # a file: triton.jit reads the kernel's source
    results = {}
    for arch in (90, 80):
        proc = subprocess.run([sys.executable, str(tmp_path / "fp8_dot.py"), str(ROOT / "bench"), str(arch)], env=compile_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[arch] = proc.stdout.strip().splitlines()
    assert results[90] == ["1"]
    assert results[80][0] == "0" and results[80][1].startswith("fp8_dot: CompilationError")
    assert "fp8e4nv not supported in this architecture" in "\n".join(results[80])
