"""Sampling speed: model.generate against transformers' generate on identical weights, and against
hardware floors measured in the same run.

    python bench/bench_generate.py                       # size sweep: tiny, d256, d512; CPU, batch 16, 64 new tokens
    python bench/bench_generate.py --sizes d512 --repeats 9
    python bench/bench_generate.py --preset small --device cuda --dtype bfloat16   # one preset, as before
    python bench/bench_generate.py --sizes llama-3.2-1b --device cuda --dtype bfloat16 --batch 64 \\
        --new-tokens 256 --decode eager,graph --json out/bench_generate_1b.json
    OMP_NUM_THREADS=1 python bench/bench_generate.py --sizes tiny,d256 --repeats 1 --new-tokens 8 --batch 4  # smoke

Sizes are model presets (model.PRESETS, e.g. tiny, small, llama-3.2-1b) or the sweep shapes below
(all 4 layers, vocabulary 2048, grouped-query attention like tiny). Both generates sample the same
number of tokens (no EOS, so no row stops early) from the same left-padded prompts. Every timed run
of a size (both generates, each floor, the copy) alternates with the others, repeat after repeat,
so that machine noise hits all alike; each number is the median over --repeats.

--decode MODE[,MODE...] passes decode=MODE to model.generate (auto, eager, static, graph; "both"
= eager,graph) and times each mode as its own row. Without --decode, generate is called without
the keyword (its default). --no-transformers skips transformers' generate (all sizes, or the listed
ones: --no-transformers=llama-3.2-1b).

Rows of the table, per size:
  transformers          transformers' LlamaForCausalLM.generate (same weights, same dtype, same prompts)
  ours[MODE]            model.generate (the whole call: prefill, new_tokens samples)
  prefill               model.generate with max_new_tokens=1: the prompts' forward and one sample,
                        the part of a call that is not a decode step (the floors leave it out)
  GEMM floor            the decode steps' matrix multiplies alone (below)
  GEMM+attn floor       the same plus attention over the KV cache (below)
  bandwidth floor       weight bytes read per decode step / the device's copy rate (below)
Columns:
  ms                    median time of the run (a floor: of all its new_tokens - 1 decode steps)
  tok/s                 generates: batch * new_tokens / ms; prefill: batch * prompt_len / ms (prompt
                        tokens, padding included); floors: batch / time of one decode step
  /GEMM /GEMM+attn /bw  this row's time over that floor's time (ours / GEMM floor = how many times
                        the fewest matrix multiplies' time our whole generate takes)
  theirs/this           transformers' time over this row's time (> 1: this row is faster)

The floors. Decoding step s (s = 0 .. new_tokens - 2; the prefill is not a decode step and is left
out) with keys L = prompt_len + s + 1 does, per layer, at the run's device and dtype, on preallocated
random weights (one set per layer, as the model reads distinct weights) and preallocated inputs:
  x[B, dim] @ Wqkv^T, Wqkv [(n_heads + 2 n_kv_heads) head_dim, dim]   (q, k, v fused: the fewest GEMMs)
  a[B, n_heads head_dim] @ Wo^T, Wo [dim, n_heads head_dim]
  x[B, dim] @ W13^T, W13 [2 hidden_dim, dim]                          (gate and up fused)
  h[B, hidden_dim] @ W2^T, W2 [dim, hidden_dim]
and once per step the output head x[B, dim] @ W^T, W [vocab, dim]. The loop over all steps and
layers is one timed run. Its GEMMs run as F.linear or as torch.mm into preallocated outputs, in
the fused layout above or split (Wq, Wk, Wv and W1, W3 as separate matrices: on a CPU one wide GEMM
is not always faster than its parts), and on CUDA also captured once as a CUDA graph and replayed;
whichever is fastest in a short calibration after the warm-up is the floor (the line under each
size and the JSON say which). The GEMM+attn floor adds, per
step and layer, F.scaled_dot_product_attention of q [B, n_heads, 1, head_dim] over k, v
[B, n_kv_heads, L, head_dim] sliced from preallocated caches (enable_gqa when n_kv_heads < n_heads,
no mask). The bandwidth floor of one step is the bytes of every parameter read once in the run
dtype (the tied output matrix once, by the head; the embedding lookup reads B rows and is ignored)
over the copy rate, 2 * nbytes / time of dst.copy_(src) on a --copy-mib buffer (a copy reads and
writes each byte). On a GPU at batch 64 that is the floor that matters; on CPU it is a memory-bound
reference only (weights that fit in the CPU's caches, as tiny's do, are read faster than DRAM copies).

The floors are generous: they leave out RMSNorm, RoPE, the SiLU gate, the residual adds, the KV
cache writes, sampling and the prefill (ours and transformers are timed over all of these), and
all per-op overhead but that of their own loop (none between kernels under a CUDA graph); the
bandwidth floor also leaves out the KV cache reads (in the JSON: kv_bytes_read_per_step_mean) and
assumes every weight streams at the copy rate. The tok/s of a floor is a decode rate (batch /
per-step time), so for a generate row tok/s ratios and time ratios differ by
new_tokens / (new_tokens - 1).

Under each size, per ours row: its decode steps alone, ours - prefill, over the GEMM and GEMM+attn
floors (what the floors measure, like for like), and the prefill over the GEMM floor: with the
GEMM+attn floor's own ratio, how far ours / GEMM floor can fall at this shape on this device.

--json PATH writes every number (per size: medians and samples in seconds, tok/s, ratios, shapes,
bytes, the copy rate) with the device, dtype, threads, versions, commit and date; it is rewritten
after each size, so a run cut short keeps the sizes it finished.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hf_io  # noqa: E402
from fileio import write_json  # noqa: E402
from model import DECODE_MODES, PRESETS, ModelArgs, Transformer  # noqa: E402

# Shapes between tiny and the GPU presets, where per-op overhead no longer dominates a CPU step.
SWEEP_SIZES: dict[str, dict] = {
    "d256": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, max_seq_len=256),
    "d512": dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, max_seq_len=256),
}
DEFAULT_SIZES = "tiny,d256,d512"
DECODE_ALIASES = {"both": ("eager", "graph")}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sizes", default=None,
                    help=f"comma-separated presets or sweep sizes ({', '.join(SWEEP_SIZES)}); "
                         f"default {DEFAULT_SIZES}, or just --preset when that is given")
parser.add_argument("--preset", default=None, help="measure this one ModelArgs preset (model.PRESETS)")
parser.add_argument("--batch", type=int, default=16, help="prompts per batch")
parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; others are shorter (left padding)")
parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per prompt (at least 2)")
parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
parser.add_argument("--repeats", type=int, default=5, help="timed runs of each; the median is reported")
parser.add_argument("--warmup", type=int, default=1,
                    help="untimed runs of each before timing (CUDA graph decoding gets at least 2)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
parser.add_argument("--decode", default=None, metavar="MODE[,MODE...]",
                    help=f"pass decode=MODE to model.generate, one row per mode: {', '.join(DECODE_MODES)}, "
                         f"or both (= eager,graph); default: call generate without the keyword")
parser.add_argument("--no-transformers", nargs="?", const="all", default=None, metavar="SIZES",
                    help="skip transformers' generate: for every size, or (--no-transformers=a,b) for those")
parser.add_argument("--copy-mib", type=int, default=0,
                    help="buffer of the copy-rate measurement, MiB (0 = 1024 on CUDA, 256 otherwise)")
parser.add_argument("--json", default=None, metavar="PATH", help="write all numbers to this JSON file")
args = parser.parse_args()

sizes = (args.sizes or (args.preset if args.preset else DEFAULT_SIZES)).split(",")
for size in sizes:
    if size not in SWEEP_SIZES and size not in PRESETS:
        parser.error(f"unknown size {size!r}; known: {', '.join([*SWEEP_SIZES, *PRESETS])}")
if args.new_tokens < 2:
    parser.error("--new-tokens must be at least 2 (the floors time the new_tokens - 1 decoding steps)")
if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or args.prompt_len < 2:
    parser.error("--batch and --repeats must be at least 1, --warmup at least 0, --prompt-len at least 2")

decode_modes: list[str] | None = None
if args.decode is not None:
    decode_modes = []
    for mode in args.decode.split(","):
        for m in DECODE_ALIASES.get(mode, (mode,)):
            if m not in DECODE_MODES:
                parser.error(f"--decode: unknown mode {m!r}; known: {', '.join(DECODE_MODES)}, both")
            if m not in decode_modes:
                decode_modes.append(m)

if args.no_transformers is None:
    skip_transformers: set[str] = set()
elif args.no_transformers == "all":
    skip_transformers = set(sizes)
else:
    skip_transformers = set(args.no_transformers.split(","))
    unknown = skip_transformers - set(sizes)
    if unknown:
        parser.error(f"--no-transformers: {', '.join(sorted(unknown))} not among --sizes")

transformers = None
if skip_transformers != set(sizes):
    import transformers  # noqa: E402  (test/bench-only dependency)

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars in the table

if args.threads:
    torch.set_num_threads(args.threads)
dtype = getattr(torch, args.dtype)
device = torch.device(args.device)
copy_nbytes = (args.copy_mib or (1024 if device.type == "cuda" else 256)) * 2**20
copy_inner = 4 if device.type == "cuda" else 1  # copies per timed run: a 1 GiB copy on a GPU is well under 1 ms


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, check=None):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    elapsed = time.perf_counter() - t0
    if check is not None:
        check(out)
    return elapsed


def device_name() -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def weight_bytes_per_step(model: Transformer) -> int:
    """Bytes of every parameter read once by a decoding step: each distinct tensor once (a tied
    output matrix counts once, as read by the head); an untied embedding table is not read (the
    lookup touches B rows)."""
    emb = model.tok_embeddings.weight
    tied = any(p is emb for name, p in model.named_parameters(remove_duplicate=False)
               if not name.startswith("tok_embeddings."))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (p is emb and not tied):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def make_floors(a: ModelArgs, steps: int):
    """The GEMM and GEMM+attention floor loops over `steps` decode steps, on preallocated tensors;
    returns (gemm_fn(variant), gemm_attn_fn(variant), shapes)."""
    B, D, H, KV, hd, hid, V = args.batch, a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim, a.vocab_size
    kw = dict(device=device, dtype=dtype)
    qkv_out = (H + 2 * KV) * hd
    layers = []
    for _ in range(a.n_layers):  # one set per layer: the model reads distinct weights (no cache reuse across layers)
        layers.append(dict(
            wqkv=torch.randn(qkv_out, D, **kw) * 0.02, wo=torch.randn(D, H * hd, **kw) * 0.02,
            w13=torch.randn(2 * hid, D, **kw) * 0.02, w2=torch.randn(D, hid, **kw) * 0.02,
            k=torch.randn(B, KV, args.prompt_len + args.new_tokens, hd, **kw),
            v=torch.randn(B, KV, args.prompt_len + args.new_tokens, hd, **kw)))
    w_out = torch.randn(V, D, **kw) * 0.02
    x, attn_in, hidden = torch.randn(B, D, **kw), torch.randn(B, H * hd, **kw), torch.randn(B, hid, **kw)
    q = torch.randn(B, H, 1, hd, **kw)
    o_qkv, o_d, o_13, o_v = (torch.empty(B, n, **kw) for n in (qkv_out, D, 2 * hid, V))
    gqa = dict(enable_gqa=True) if KV < H else {}
    lengths = [args.prompt_len + s + 1 for s in range(steps)]

    for lw in layers:  # the split layout's matrices (wq, wk, wv; w1, w3): row blocks, contiguous
        lw["qkv_parts"] = lw["wqkv"].split((H * hd, KV * hd, KV * hd))
        lw["w13_parts"] = lw["w13"].chunk(2)
    split_out = {n: torch.empty(B, n, **kw) for n in (H * hd, KV * hd, hid)}  # mm_out's outputs of the parts

    def loop(variant: str, attention: bool):
        """variant: linear or mm_out (how the GEMMs run), and _split for q, k, v and gate, up as
        separate matrices (Meta's layout): on a CPU, one wide GEMM is not always faster than its
        parts, so the floor is whichever layout runs faster here."""
        split = variant.endswith("_split")
        mm_out = variant.startswith("mm_out")

        def gemm(inp, w, out):
            if mm_out:
                torch.mm(inp, w.t(), out=out if out.shape[1] == w.shape[0] else split_out[w.shape[0]])
            else:
                F.linear(inp, w)

        def run():
            with torch.inference_mode():
                for L in lengths:
                    for lw in layers:
                        for w in lw["qkv_parts"] if split else (lw["wqkv"],):
                            gemm(x, w, o_qkv)
                        if attention:
                            F.scaled_dot_product_attention(q, lw["k"].narrow(2, 0, L), lw["v"].narrow(2, 0, L), **gqa)
                        gemm(attn_in, lw["wo"], o_d)
                        for w in lw["w13_parts"] if split else (lw["w13"],):
                            gemm(x, w, o_13)
                        gemm(hidden, lw["w2"], o_d)
                    if mm_out:
                        torch.mm(x, w_out.t(), out=o_v)
                    else:
                        F.linear(x, w_out)
        return run

    shapes = {  # [M, K] @ [K, N] of each GEMM, per layer and step; the head once per step
        "qkv": [B, D, qkv_out], "wo": [B, H * hd, D], "w13": [B, D, 2 * hid], "w2": [B, hid, D], "head": [B, D, V],
        "attention": {"q": [B, H, 1, hd], "kv": [B, KV, "L", hd], "L": [lengths[0], lengths[-1]],
                      "enable_gqa": bool(gqa)},
    }
    return (lambda variant: loop(variant, False)), (lambda variant: loop(variant, True)), shapes


def cuda_graphed(fn):
    """fn captured once as a CUDA graph (after a run on a side stream, as capture requires); returns its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def fmt_ratio(r):
    return f"{r:10.2f}x" if r is not None else f"{'-':>11}"


def bench(size: str, results: dict):
    model_args = ModelArgs(**SWEEP_SIZES[size]) if size in SWEEP_SIZES else ModelArgs.from_name(size)
    a = model_args
    ours = Transformer(model_args).to(device)
    ours.init_weights(seed=0)
    ours = ours.to(dtype).eval()  # rounded once here; transformers loads these same rounded weights
    theirs = None
    if size not in skip_transformers:
        with tempfile.TemporaryDirectory() as tmp:
            hf_io.save_pretrained(ours, tmp)
            theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch,), generator=g)
    lengths[0] = args.prompt_len
    ids = torch.randint(3, model_args.vocab_size, (args.batch, args.prompt_len), generator=g)
    mask = (torch.arange(args.prompt_len)[None] >= args.prompt_len - lengths[:, None]).long()
    ids = (ids * mask).to(device)
    mask = mask.to(device)

    def check_shape(out):
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape

    def run_ours(mode):
        kwargs = {} if mode is None else dict(decode=mode)
        return lambda: ours.generate(ids, mask, max_new_tokens=args.new_tokens, temperature=args.temperature,
                                     **kwargs)

    def run_theirs():
        kwargs = dict(do_sample=args.temperature > 0, top_p=1.0, top_k=0)
        if args.temperature > 0:
            kwargs["temperature"] = args.temperature
        with torch.no_grad():
            return theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, pad_token_id=0, **kwargs)

    steps = args.new_tokens - 1
    gemm_fn, gemm_attn_fn, gemm_shapes = make_floors(model_args, steps)
    src = torch.empty(copy_nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)

    def run_copy():
        for _ in range(copy_inner):
            dst.copy_(src)

    # name -> (function, check, warm-up runs)
    runs: dict = {}
    if theirs is not None:
        runs["transformers"] = (run_theirs, check_shape, args.warmup)
    for mode in decode_modes or [None]:
        # graph decoding (auto and generate's default are it on CUDA) records its graph in each call
        warm = max(args.warmup, 2) if mode in (None, "graph", "auto") and device.type == "cuda" else args.warmup
        runs["ours" if mode is None else f"ours[{mode}]"] = (run_ours(mode), check_shape, warm)
    runs["prefill"] = (lambda: ours.generate(ids, mask, max_new_tokens=1, temperature=args.temperature),
                       lambda out: None, args.warmup)
    for fn, check, warm in runs.values():
        for _ in range(warm):
            check(fn())

    # The cheapest way to run the floors' GEMMs here, chosen on the GEMM floor: F.linear (allocates its
    # outputs), torch.mm into preallocated outputs, and on CUDA the latter replayed as one CUDA graph
    # (no launch overhead between kernels, as decoding under CUDA graphs has).
    floor_variants = {v: (gemm_fn(v), gemm_attn_fn(v)) for v in ("linear", "mm_out", "linear_split", "mm_out_split")}
    for fns in floor_variants.values():
        for fn in fns:
            for _ in range(max(args.warmup, 1)):
                timed(fn)
    if device.type == "cuda":
        try:
            for v in ("mm_out", "mm_out_split"):
                floor_variants[f"{v}+cuda_graph"] = tuple(cuda_graphed(fn) for fn in floor_variants[v])
        except RuntimeError as e:  # a floor without graphs is still a (looser) floor
            print(f"  (floors not captured as CUDA graphs: {type(e).__name__}: {e})", flush=True)
    for _ in range(max(args.warmup, 1)):
        timed(run_copy)
    calib = {v: [] for v in floor_variants}
    for _ in range(3):
        for v, ts in calib.items():
            ts.append(timed(floor_variants[v][0]))
    variant = min(calib, key=lambda v: statistics.median(calib[v]))
    runs["gemm_floor"] = (floor_variants[variant][0], None, 0)
    runs["gemm_attn_floor"] = (floor_variants[variant][1], None, 0)
    runs["copy"] = (run_copy, None, 0)

    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits all alike
        for name, (fn, check, _) in runs.items():
            times[name].append(timed(fn, check))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    copy_rate = 2 * copy_nbytes * copy_inner / med.pop("copy")  # bytes/s: a copy reads and writes each byte
    w_bytes = weight_bytes_per_step(ours)
    bw_step = w_bytes / copy_rate
    med["bandwidth_floor"] = steps * bw_step
    mean_keys = args.prompt_len + (steps + 1) / 2  # keys of decode step s: prompt_len + s + 1
    kv_mean = 2 * a.n_layers * args.batch * a.n_kv_heads * a.head_dim * (torch.finfo(dtype).bits // 8) * mean_keys

    tokens = args.batch * args.new_tokens
    generates = [n for n in med if n == "transformers" or n.startswith("ours")]
    floors = ["gemm_floor", "gemm_attn_floor", "bandwidth_floor"]
    tok_s = {n: tokens / med[n] for n in generates}
    tok_s["prefill"] = args.batch * args.prompt_len / med["prefill"]  # prompt tokens (padding included) per second
    tok_s.update({n: args.batch * steps / med[n] for n in floors})
    ratios = {}
    for n in generates:
        for f in floors:
            ratios[f"{n}/{f}"] = med[n] / med[f]
    ratios["prefill/gemm_floor"] = med["prefill"] / med["gemm_floor"]
    if "transformers" in med:
        for n in generates:
            if n != "transformers":
                ratios[f"transformers/{n}"] = med["transformers"] / med[n]
    decode_only = {n: med[n] - med["prefill"] for n in generates if n.startswith("ours")}
    for n, t in decode_only.items():
        ratios[f"{n}_decode_steps/gemm_floor"] = t / med["gemm_floor"]
        ratios[f"{n}_decode_steps/gemm_attn_floor"] = t / med["gemm_attn_floor"]
    ratios["gemm_attn_floor/gemm_floor"] = med["gemm_attn_floor"] / med["gemm_floor"]
    ratios["gemm_floor/bandwidth_floor"] = med["gemm_floor"] / med["bandwidth_floor"]

    # -- the table
    labels = {"transformers": "transformers", "prefill": "prefill (ours)", "gemm_floor": "GEMM floor",
              "gemm_attn_floor": "GEMM+attn floor", "bandwidth_floor": "bandwidth floor"}
    params = ours.num_params()
    head = f"{size:>12} {params / 1e6:8.2f}M"
    for i, n in enumerate([*generates, "prefill", *floors]):
        cells = []
        for f in floors:
            blank = n == f or (n == "prefill" and f != "gemm_floor")  # the prefill is set against the GEMMs only
            cells.append(fmt_ratio(None if blank else med[n] / med[f]))
        theirs_ratio = med["transformers"] / med[n] if "transformers" in med and n in generates else None
        print(f"{head if i == 0 else ' ' * len(head)} | {labels.get(n, n):<17} {med[n] * 1e3:10.3f} "
              f"{tok_s[n]:10.0f} |{''.join(cells)} |{fmt_ratio(theirs_ratio)}")
    print(f"{'':>22}   layers {a.n_layers}, dim {a.dim}, heads {a.n_heads}/{a.n_kv_heads} x {a.head_dim}, "
          f"hidden {a.hidden_dim}, vocab {a.vocab_size}{', tied' if a.tie_embeddings else ''}; "
          f"{w_bytes / 2**20:.1f} MiB of weights per step, copy {copy_rate / 1e9:.1f} GB/s, "
          f"GEMMs as {variant}, {steps} decode steps", flush=True)
    for n, t in decode_only.items():
        print(f"{'':>22}   {n} decode steps (ours - prefill) {t * 1e3:.3f} ms = {t / med['gemm_floor']:.2f}x GEMM, "
              f"{t / med['gemm_attn_floor']:.2f}x GEMM+attn floor; prefill = {ratios['prefill/gemm_floor']:.2f}x "
              f"GEMM floor", flush=True)

    results["sizes"][size] = {
        "shapes": {k: getattr(a, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                                              "vocab_size", "tie_embeddings")},
        "params": params,
        "tokens": tokens,
        "decode_steps": steps,
        "gemm_shapes": gemm_shapes,
        "gemm_variant": variant,
        "gemm_variant_calibration_s": calib,
        "weight_bytes_per_step": w_bytes,
        "kv_bytes_read_per_step_mean": int(kv_mean),
        "copy": {"nbytes": copy_nbytes, "copies_per_run": copy_inner, "samples_s": times["copy"],
                 "median_s": 2 * copy_nbytes * copy_inner / copy_rate, "rate_bytes_per_s": copy_rate},
        "bandwidth_floor_step_s": bw_step,
        "median_s": med,
        "samples_s": {n: ts for n, ts in times.items() if n != "copy"},
        "decode_steps_s": decode_only,
        "tokens_per_s": tok_s,
        "ratios": ratios,
        "transformers": theirs is not None,
    }
    if args.json:
        write_json(args.json, results)



results = {
    "bench": "bench_generate",
    "date": datetime.now(UTC).isoformat(timespec="seconds"),
    "argv": sys.argv[1:],
    "args": vars(args),
    "device": str(device),
    "device_name": device_name(),
    "dtype": args.dtype,
    "threads": torch.get_num_threads(),
    "torch": torch.__version__,
    "transformers": transformers.__version__ if transformers is not None else None,
    "git": git_commit(),
    "decode_modes": decode_modes,
    "sizes": {},
}
print(f"device={device} ({results['device_name']}) dtype={args.dtype} batch={args.batch} prompt<={args.prompt_len} "
      f"new={args.new_tokens} temperature={args.temperature} threads={torch.get_num_threads()} "
      f"decode={','.join(decode_modes) if decode_modes else '(generate default)'} median of {args.repeats}; "
      f"torch {torch.__version__}" + (f", transformers {transformers.__version__}" if transformers else ""))
print(f"{'size':>12} {'params':>9} | {'run':<17} {'ms':>10} {'tok/s':>10} |"
      f"{'/GEMM':>11}{'/GEMM+attn':>11}{'/bw':>11} |{'theirs/this':>11}")
for size in sizes:
    bench(size, results)
    if device.type == "cuda":  # the models, floors and copy buffers of this size are gone with bench()'s frame
        torch.cuda.empty_cache()
