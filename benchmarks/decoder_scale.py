"""Benchmark (issue 37): the factorize stage on a decoder of 1B-class width, per matrix, extrapolated to 1B and 7B.

No decoder weights are reachable offline, so the model is a randomly initialised Llama with TinyLlama-1.1B's
widths (hidden 2048, FFN 5632, 32 heads, 4 key-value heads) and 2 blocks: enough to time every kind of matrix
(Q, K, V, O, gate, up, down). The importance is real in kind: Fisher and the input Gram matrices come from
`collect_importance` over random tokens through the sequence-classification head. Each (method, matrix) is
factorized in its own process, which loads only that matrix and its statistics, so its peak RSS is what
factorizing that matrix costs (`peak_rss` minus the RSS after loading: `workspace`).

The extrapolation assumes a matrix's time grows as `out * in * min(out, in)` (an SVD's work; ALS's sweeps
grow the same way with the rank at a fixed keep ratio), each method's constant fitted on the measured matrices,
and its workspace as a constant plus WORKSPACE's growth, through the smallest and largest matrix measured; at the default width the 1B row only multiplies by the blocks. The stage
as written holds the whole model and every target's statistics in memory at once; the table says what that is
for 1B and 7B against 24 GB, and STREAMING how a method that does not fit would stream.

    .venv/bin/python benchmarks/decoder_scale.py            # the real run: a quiet machine (16 cores: tens of minutes)
    .venv/bin/python benchmarks/decoder_scale.py --hidden 256 --ffn 704 --heads 4 --kv-heads 1 --no-write  # a check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GIB = 1024**3
METHODS = {"svd": "none", "svd_llm": "gram", "tfwsvd": "fisher"}  # method: the statistic it reads
# How a method's workspace grows with the matrix `(out, in)`: an SVD's copies; plus SVD-LLM's `(in, in)` Cholesky;
# ALS's copies (its table of pair products is capped at weighted_solvers.PAIR_ELEMENTS, made a slice at a time past it).
WORKSPACE = {"svd": lambda o, i: o * i, "svd_llm": lambda o, i: o * i + i * i, "tfwsvd": lambda o, i: o * i}
# Whole models to extrapolate to: (hidden, FFN, layers, key-value width).
TARGET_MODELS = {"1B (TinyLlama-1.1B)": (2048, 5632, 22, 256), "7B (Llama-2-7B)": (4096, 11008, 32, 4096)}
MEMORY = 24 * GIB


def shapes(hidden: int, ffn: int, kv: int) -> dict[str, tuple[int, int]]:
    """`(out, in)` of each matrix of a Llama block."""
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn)}


def reset_peak_rss() -> int:
    """The current RSS, after resetting the process's peak to it (Linux: writing 5 to clear_refs resets VmHWM), so
    the peak read later is that of what ran in between, not of importing torch."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"/proc/self/status has no {key}")


def worker(folder: Path, method: str, rank: int, steps: int) -> dict[str, float]:
    """Factorize one saved matrix (in this process alone): seconds and peak RSS, before and after."""
    from lowrank.api import configure, factorizer

    tensors = load_file(str(folder / "matrix.safetensors"))
    statistic = METHODS[method]
    importance = tensors.get(statistic)
    factorize = factorizer(configure(None, {"method": method, "solver_steps": steps}))
    torch.linalg.svd(torch.randn(64, 64, dtype=torch.float64))  # the first LAPACK call starts its thread pools: not timed
    loaded = reset_peak_rss()
    started = time.perf_counter()
    a, b = factorize(tensors["weight"], rank, importance=importance)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "loaded_rss": loaded, "peak_rss": peak_rss(), "rank": a.shape[1]}


def measure(args: argparse.Namespace) -> list[dict]:
    """Every matrix of the model through every method, one process each."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lowrank.linalg.ranks import uniform_ranks
    from lowrank.modules.matching import find_targets, matrix_type
    from lowrank.modules.surgery import dense_weights
    from lowrank.train.importance import collect_importance

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=1000,
                         pad_token_id=0, num_labels=2)  # a small vocabulary: the embeddings are never targets
    model = LlamaForSequenceClassification(config)
    names = find_targets(model)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 1000, (args.batch, args.seq_len), generator=generator),
                "attention_mask": torch.ones(args.batch, args.seq_len, dtype=torch.long),
                "labels": torch.randint(0, 2, (args.batch,), generator=generator)} for _ in range(args.batches)]
    stats = collect_importance(model, batches, names, progress=False, activations=True)
    weights = dense_weights(model, names)
    ranks = uniform_ranks({n: tuple(w.shape) for n, w in weights.items()}, args.keep_ratio)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = Path(tmp) / name
            folder.mkdir()
            save_file({"weight": weights[name].contiguous(), "fisher": stats["fisher"].scores[name].contiguous(),
                       "gram": stats["gram"].scores[name].contiguous()}, str(folder / "matrix.safetensors"))
        del model, stats, weights
        for method in METHODS:
            for name in names:
                if ranks[name] is None:
                    continue
                command = [sys.executable, __file__, "--worker", str(Path(tmp) / name), "--method", method,
                           "--rank", str(ranks[name]), "--steps", str(args.steps)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                row = {"method": method, "layer": name, "type": matrix_type(name), **result}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def summarize(rows: list[dict], measured: dict[str, tuple[int, int]]) -> tuple[list[list], list[list]]:
    """Per (method, matrix type): mean seconds and workspace; and the extrapolation to whole models."""
    per_type, fits = [], {}
    measured_kinds = [kind for kind in measured if any(r["type"] == _TYPE[kind] for r in rows)]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        work = flops = 0.0
        points = []  # (growth, workspace bytes)
        for kind, (out, inp) in measured.items():
            same = [r for r in mine if r["type"] == _TYPE[kind]]
            if not same:
                continue
            seconds = sum(r["seconds"] for r in same) / len(same)
            workspace = max(r["peak_rss"] - r["loaded_rss"] for r in same)
            per_type.append([method, kind, f"{out} x {inp}", same[0]["rank"], seconds, workspace / 2**20])
            work += seconds
            flops += out * inp * min(out, inp)
            points.append((WORKSPACE[method](out, inp), workspace))
        fits[method] = (work / flops, _line(points))
    whole = []
    for label, (hidden, ffn, layers, kv) in TARGET_MODELS.items():
        matrices = shapes(hidden, ffn, kv)
        weights = layers * sum(o * i for o, i in matrices.values()) * 4  # fp32, as the stage loads them
        factorized = [matrices[kind] for kind in measured_kinds]  # those the uniform rank leaves dense cost no time
        for method, (per_flop, (fixed, per_entry)) in fits.items():
            seconds = layers * sum(per_flop * o * i * min(o, i) for o, i in factorized)
            statistic = {"none": 0, "fisher": weights, "gram": layers * sum(i * i for _, i in matrices.values()) * 4}[METHODS[method]]
            workspace = max(fixed + per_entry * WORKSPACE[method](o, i) for o, i in factorized)
            resident = weights + statistic + workspace
            block = (weights + statistic) / layers + workspace  # streamed: one block and one matrix's workspace
            verdict = "yes" if resident <= MEMORY else "streamed a block at a time" if block <= MEMORY else "no"
            whole.append([label, method, seconds / 60, weights / GIB, statistic / GIB, workspace / GIB, resident / GIB,
                          block / GIB, verdict])
    return per_type, whole


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """`(a, b)` of `workspace = a + b growth` through the smallest and the largest matrix (a process's fixed
    allocations would otherwise be scaled with the matrix); a constant when they do not grow."""
    (g_low, w_low), (g_high, w_high) = min(points), max(points)
    if g_high <= g_low or w_high <= w_low:
        return max(w for _, w in points), 0.0
    slope = (w_high - w_low) / (g_high - g_low)
    return w_low - slope * g_low, slope


_TYPE = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attention_output", "gate_proj": "ffn_gate",
         "up_proj": "ffn_in", "down_proj": "ffn_out"}


STREAMING = """A method that does not fit 24 GB as the stage runs today (the whole fp32 model and every target's statistics
in memory) fits once the factorize stage streams: the matrices are independent, so it can read one block's
weights and statistics at a time from their safetensors files (`safe_open(...).get_tensor(name)`, no whole-file
load), factorize them and write their factors, holding one block plus one matrix's workspace. SVD-LLM's Gram
matrices must also be gathered a block at a time (run the calibration tokens through block k, keep only its
inputs' `X^T X`, then feed its outputs to block k+1), as SVD-LLM's own code does: the fisher pass as written
holds a float64 Gram for every target at once. Q, K and V (and gate and up) read the same input and could share
one Gram matrix. TFWSVD's ALS makes its table of pair products (`rank^2 / 2` by the width: 40 GiB for a 7B FFN
matrix at rank 1300) a slice at a time past 1 GiB, so one matrix's workspace stays a few copies of the matrix."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=10, help="ALS sweeps (factorize.solver_steps)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-write", action="store_true", help="print only: a check run, not figures for BENCHMARKS.md")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.method, args.rank, args.steps)))
        return
    rows = measure(args)
    measured = shapes(args.hidden, args.ffn, args.hidden // args.heads * args.kv_heads)
    per_type, whole = summarize(rows, measured)
    from report import table, write_section

    setting = (
        f"A random Llama of hidden {args.hidden}, FFN {args.ffn}, {args.heads} heads ({args.kv_heads} key-value), "
        f"{args.layers} blocks; keep ratio {args.keep_ratio} (uniform rank), tfwsvd on ALS with {args.steps} sweeps. "
        "Seconds are the mean over the blocks; workspace is the peak RSS of factorizing the matrix minus the RSS with "
        "it and its statistics loaded.\n\n"
    )
    extrapolated = (
        "Extrapolated to whole models (time as out·in·min(out, in), fitted per method; memory as the stage holds it "
        "today: fp32 weights, the method's statistics for every target, the largest matrix's workspace; matrices the "
        "uniform rank leaves dense cost nothing):\n\n"
        + table(["model", "method", "factorize minutes", "weights GiB", "statistics GiB", "workspace GiB", "resident GiB",
                 "streamed GiB", "fits 24 GB"], whole)
        + "\n\n" + STREAMING
    )
    body = setting + table(["method", "matrix", "shape", "rank", "seconds", "workspace MiB"], per_type) + "\n\n" + extrapolated
    print(body)
    if not args.no_write:
        command = "python benchmarks/decoder_scale.py " + " ".join(sys.argv[1:])
        write_section("decoder-scale", "The factorize stage at decoder scale: 1B and 7B (issue 37)", command.strip(), body,
                      results="families.md")  # BENCHMARKS.md is written by hand from it (report.py)


if __name__ == "__main__":
    main()
