"""bench/bench_generate.py runs end to end at a toy shape and its JSON adds up: the floors are
positive, ours and transformers sampled the tokens asked for, and the decode-steps line is the
whole call less the prefill (its timings, not its speed, are what the bench is for)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("transformers_row", [True, False])
def test_bench_generate_smoke(tmp_path, transformers_row):
    if transformers_row:
        pytest.importorskip("transformers")  # the reference row (a test-only dependency)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_generate.py"), "--sizes", "tiny", "--repeats", "1",
           "--warmup", "0", "--new-tokens", "3", "--batch", "2", "--prompt-len", "4", "--copy-mib", "1",
           "--decode", "eager,static", "--json", str(out)]
    if not transformers_row:
        cmd.append("--no-transformers")
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr
    size = json.loads(out.read_text())["sizes"]["tiny"]
    med = size["median_s"]
    assert set(med) >= {"ours[eager]", "ours[static]", "prefill", "gemm_floor", "gemm_attn_floor", "bandwidth_floor"}
    assert ("transformers" in med) == transformers_row
    assert all(t > 0 for t in med.values())
    for mode in ("ours[eager]", "ours[static]"):
        assert size["decode_steps_s"][mode] == pytest.approx(med[mode] - med["prefill"])
        assert size["ratios"][f"{mode}_decode_steps/gemm_floor"] == pytest.approx(
            (med[mode] - med["prefill"]) / med["gemm_floor"])
    assert size["tokens"] == 2 * 3 and size["decode_steps"] == 2
    assert "prefill (ours)" in run.stdout and "decode steps (ours - prefill)" in run.stdout
