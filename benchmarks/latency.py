"""Benchmark (issue 3e): CPU latency of compressed vs dense models beside the ideal multiply-add ratio.

Factorizes the model at each keep ratio (plain SVD: latency does not depend on
the method), with ranks as they come and rounded to a multiple of 8, and
times dense and compressed forward passes side by side in one process:
batch 1 and 32, random tokens, the variants taking `--rounds` turns of
`--repeats` timed calls, median. The ideal speed-up counts multiply-adds per
token of every Linear layer plus attention's two products.

    .venv/bin/python benchmarks/latency.py [--model artifacts/finetune/model]
"""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from lowrank.io.checkpoints import load_compressed
from lowrank.io.export import export_onnx, onnx_node_kind, onnx_session
from lowrank.modules.layers import FactorizedLinear
from lowrank.modules.matching import find_targets
from lowrank.io.models import packaged_model_dir
from lowrank.linalg.ranks import uniform_ranks
from lowrank.linalg.solvers import get_solver
from lowrank.modules.surgery import dense_weights, factorize_model

from report import table, write_section

RUNTIMES = {
    "torch": "eager PyTorch",
    "onnxruntime": "onnxruntime (each model's checked ONNX export, attention exported through {attention}, all graph optimizations)",
    "compile": "torch.compile (inductor, freezing on, one static graph per batch size; compiled during the warm-up)",
    "compile-max": "torch.compile with mode max-autotune and the C++ wrapper (inductor, freezing on; GEMMs autotuned "
    "among ATen and inductor's C++ templates, no Python between kernels; compiled during the warm-up)",
}


def linear_macs_per_token(model: nn.Module) -> int:
    """Multiply-adds per token of the Linear layers (dense or factorized), not the classifier's."""
    # A FactorizedLinear's two factors are nn.Linear modules themselves: counting Linear layers counts them once.
    total = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    return total - sum(m.in_features * m.out_features for n, m in model.named_modules() if n.endswith("classifier"))


def macs_per_token(model: nn.Module, seq_len: int) -> int:
    """Multiply-adds per token: the Linear layers, and QK^T and AV in every block (which no factorization shrinks)."""
    config = model.config
    return linear_macs_per_token(model) + 2 * config.num_hidden_layers * seq_len * config.hidden_size


def exported_session(model: nn.Module, path: Path, eager_attention: bool):
    """The library's onnxruntime session on the model's checked export."""
    export_onnx(model, path, eager_attention=eager_attention)
    return onnx_session(path)


def onnx_call(session, batch: int, seq_len: int) -> Callable[[], object]:
    """One forward pass of an onnxruntime session on random tokens (the same for every session)."""
    ids = np.random.default_rng(0).integers(0, 1000, (batch, seq_len)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return lambda: session.run(None, feed)


def torch_call(model: nn.Module, batch: int, seq_len: int) -> Callable[[], object]:
    """One forward pass of a PyTorch model on random tokens (the same for every model)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def call() -> object:
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask)

    return call


def timed_in_turns(calls: dict[str, Callable[[], object]], rounds: int, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median ms per call of each variant, over `rounds` turns of `repeats` timed calls.

    The variants take turns in a rotating order, so a slow spell of the machine
    (a shared 2-core VM drifts by 10% over minutes) falls on all of them alike
    and their ratios stay fair; each turn starts with an untimed call, so a
    variant runs with its weights in cache, as a server running one model does.
    """
    for call in calls.values():
        for _ in range(warmup):  # also compiles, for torch.compile
            call()
    times: dict[str, list[float]] = {label: [] for label in calls}
    labels = list(calls)
    for turn in range(rounds):
        for label in labels[turn % len(labels):] + labels[: turn % len(labels)]:
            calls[label]()
            for _ in range(repeats):
                started = time.perf_counter()
                calls[label]()
                times[label].append(time.perf_counter() - started)
    return {label: statistics.median(values) * 1e3 for label, values in times.items()}


def compiled(model: nn.Module, autotune: bool = False) -> nn.Module:
    """The model through inductor with its weights frozen as constants, so the
    element-wise work around each thin GEMM (bias, GELU, residual adds) can fuse
    and the factor weights can be pre-packed; one graph per input shape.
    `autotune` also times each GEMM shape against inductor's C++ templates and drops
    the Python launcher, whose per-kernel cost might weigh more on the model with
    twice as many GEMMs (measured: it sped up the dense model, not the factorized one)."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    inductor.cpp_wrapper = autotune
    return torch.compile(model, dynamic=False, mode="max-autotune" if autotune else None)


GEMM_OPS = ("addmm", "aten::mm", "mkl_linear", "mkldnn_linear", "aten::linear")  # the Linear layers' products
ATTENTION_OPS = ("bmm", "scaled_dot_product", "attention", "softmax")  # attention's two products and softmax


def profile_split(model: nn.Module, batch: int, seq_len: int, repeats: int) -> dict[str, float]:
    """Milliseconds per forward pass in Linear GEMMs, in attention, and in the rest, by the
    profiler's self times: where a compressed model's time goes that its multiply-adds do not explain."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(input_ids=ids, attention_mask=mask)
        wall = (time.perf_counter() - started) * 1e3 / repeats
    split = {"linear GEMMs": 0.0, "attention": 0.0, "other ops": 0.0}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = "linear GEMMs" if any(k in name for k in GEMM_OPS) else "attention" if any(k in name for k in ATTENTION_OPS) else "other ops"
        split[kind] += event.self_cpu_time_total / 1e3 / repeats
    split["outside ops (Python, dispatch)"] = max(0.0, wall - sum(split.values()))
    return {**split, "wall (profiled)": wall}


def onnx_profile_split(path: Path, batch: int, seq_len: int, repeats: int) -> dict[str, float]:
    """The split of `profile_split` for an exported model in onnxruntime, by its per-node
    profiler: kernel times of the Linear products (MatMul or Gemm by a weight),
    of attention (its batched products and softmax), and of every other node."""
    prefix = str(path.with_suffix("")) + f"-profile-b{batch}"
    session = onnx_session(path, profile_prefix=prefix)
    call = onnx_call(session, batch, seq_len)
    for _ in range(3):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    wall = (time.perf_counter() - started) * 1e3 / repeats
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-repeats:]
    start, end = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"]  # the timed runs only, not the warm-up
    split = {"linear GEMMs": 0.0, "attention": 0.0, "other ops": 0.0}
    columns = {"linear": "linear GEMMs", "attention": "attention", "other": "other ops"}
    for event in events:
        kind = onnx_node_kind(event)
        if kind is not None and start <= event["ts"] <= end:
            split[columns[kind]] += event["dur"] / 1e3 / repeats
    split["outside ops (Python, dispatch)"] = max(0.0, wall - sum(split.values()))
    return {**split, "wall (profiled)": wall}


def compress(model: nn.Module, keep_ratio: float, rank_multiple: int) -> nn.Module:
    model = copy.deepcopy(model)
    names = find_targets(model)
    weights = dense_weights(model, names)
    ranks = uniform_ranks({n: tuple(w.shape) for n, w in weights.items()}, keep_ratio, rank_multiple)
    factorize_model(model, {n: get_solver("truncated_svd")(weights[n], r) for n, r in ranks.items() if r is not None})
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--shape", default=None, choices=["bert-base"],
                        help="instead of --model, random weights in this architecture's shapes (time does not depend on the values)")
    parser.add_argument("--ratios", default="0.5,0.3,0.15")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant and turn")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--profile", action="store_true",
                        help="also split each variant's time into Linear GEMMs, attention and the rest (torch.profiler, or onnxruntime's profiler)")
    parser.add_argument("--multiples", default="1,8", help="rank multiples to time at each ratio (factorize.rank_multiple)")
    parser.add_argument("--runtime", default="torch", choices=list(RUNTIMES),
                        help="eager PyTorch, the exported ONNX model in onnxruntime (all graph optimizations), "
                        "or torch.compile (inductor, weights frozen as constants)")
    parser.add_argument("--onnx-attention", default="eager", choices=["eager", "sdpa", "both"],
                        help="onnxruntime: export attention through transformers' eager path (the library's default), "
                        "as scaled_dot_product_attention, whose ONNX rule adds a NaN guard over every score tensor, or both side by side")
    parser.add_argument("--rounds", type=int, default=8, help="turns: the variants take turns this many times, in a rotating order")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of every runtime (default: torch's, one per core); 1 is the usual setting "
                        "of a CPU server that runs one request per core")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads: at least 1")
        torch.set_num_threads(args.threads)  # onnxruntime sessions take torch's count (lowrank.export.onnx_session)
    if args.onnx_attention != "eager" and args.runtime != "onnxruntime":
        raise SystemExit("--onnx-attention: with --runtime onnxruntime only")
    if args.profile and args.onnx_attention == "both":
        raise SystemExit("--profile: one --onnx-attention export at a time")
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))

    if args.shape:
        torch.manual_seed(0)
        dense = BertForSequenceClassification(BertConfig()).eval()  # BertConfig's defaults are BERT-base's shapes
    else:
        dense = load_compressed(args.model or packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")).eval()
    model_name = f"random {args.shape}" if args.shape else "all-MiniLM-L6-v2"
    variants = {"dense": dense}
    for ratio in map(float, args.ratios.split(",")):
        for multiple in map(int, args.multiples.split(",")):
            variants[f"{ratio} (x{multiple})"] = compress(dense, ratio, multiple)

    # What is timed: a label per (variant, ONNX export), each beside the dense model of the same runtime and export.
    exports = ["eager", "sdpa"] if args.onnx_attention == "both" else [args.onnx_attention]
    labels = {(name, export): name + ("" if export == exports[0] else ", SDPA export") for export in exports for name in variants}
    if args.runtime == "onnxruntime":
        folder = Path(tempfile.mkdtemp(prefix="latency-onnx-"))  # kept until the end: --profile opens fresh sessions on the files
        atexit.register(shutil.rmtree, folder, True)
        onnx_paths = {label: folder / f"{i}.onnx" for i, label in enumerate(labels.values())}
        sessions = {label: exported_session(variants[name], onnx_paths[label], export == "eager") for (name, export), label in labels.items()}

        def call(label: str, batch: int) -> Callable[[], object]:
            return onnx_call(sessions[label], batch, args.seq_len)
    else:
        if args.runtime.startswith("compile"):
            variants_run = {name: compiled(model, args.runtime == "compile-max") for name, model in variants.items()}
        else:
            variants_run = variants

        def call(label: str, batch: int) -> Callable[[], object]:
            return torch_call(variants_run[label], batch, args.seq_len)

    dense_macs = macs_per_token(dense, args.seq_len)
    ideals = {name: dense_macs / macs_per_token(model, args.seq_len) for name, model in variants.items()}
    linear_ideals = {name: linear_macs_per_token(dense) / linear_macs_per_token(model) for name, model in variants.items()}
    medians = {
        batch: timed_in_turns({label: call(label, batch) for label in labels.values()}, args.rounds, args.repeats)
        for batch in batch_sizes
    }

    rows = []
    for (name, export), label in labels.items():
        model, ideal, dense_label = variants[name], ideals[name], labels[("dense", export)]
        ranks = sorted({m.rank for m in model.modules() if isinstance(m, FactorizedLinear)})
        row = [label, ",".join(map(str, ranks)) or "-", ideal]
        for batch in batch_sizes:
            speedup = medians[batch][dense_label] / medians[batch][label]
            row += [medians[batch][label], speedup, speedup / ideal]
        rows.append(row)
        print(row, flush=True)
    header = ["model (keep ratio, rank multiple)", "ranks", "ideal speed-up"]
    for batch in batch_sizes:
        header += [f"ms b={batch}", f"speed-up b={batch}", f"share of ideal b={batch}"]
    runtime = RUNTIMES[args.runtime].format(attention={
        "eager": "transformers' eager path",
        "sdpa": "scaled_dot_product_attention",
        "both": "transformers' eager path, or scaled_dot_product_attention in the rows that say SDPA export",
    }[args.onnx_attention])
    body = (
        f"{model_name} (sequence classification) in {runtime}, sequence length {args.seq_len}, median of {args.rounds * args.repeats} "
        f"runs after 3 warm-up runs, taken in {args.rounds} turns of {args.repeats} (each after an untimed call) in a rotating "
        f"order across the variants, all in one process. "
        f"Ideal speed-up: dense multiply-adds per token over compressed ones (Linear layers and attention products).\n\n"
        + table(header, rows)
    )
    if args.profile:
        split_rows, bound_rows = [], []
        for batch in batch_sizes:
            profiled = args.rounds * args.repeats
            if args.runtime == "onnxruntime":
                splits = {name: onnx_profile_split(onnx_paths[name], batch, args.seq_len, profiled) for name in variants}
            else:
                splits = {name: profile_split(variants_run[name], batch, args.seq_len, profiled) for name in variants}
            split_rows += [[name, batch, *split.values()] for name, split in splits.items()]
            dense_split = splits["dense"]
            gemm, wall = dense_split["linear GEMMs"], dense_split["wall (profiled)"]
            for name in variants:
                if name != "dense":
                    ideal, linear_ideal = ideals[name], linear_ideals[name]
                    gemm_speedup = gemm / splits[name]["linear GEMMs"]
                    # Amdahl: the dense model's Linear GEMMs shrunk by exactly their multiply-add ratio, everything else as it is
                    best = wall / (gemm / linear_ideal + wall - gemm)
                    bound_rows.append([name, batch, ideal, linear_ideal, gemm_speedup, gemm_speedup / linear_ideal, best / ideal])
        body += (
            "\n\nWhere the time goes, in ms per forward pass ("
            + ("onnxruntime's per-node kernel times" if args.runtime == "onnxruntime" else "torch.profiler self times")
            + ", "
            f"{args.rounds * args.repeats} profiled runs; the profiler adds its own overhead, so its wall time is above the table's):\n\n"
            + table(["model", "batch", *dense_split.keys()], split_rows)
            + "\n\nThe Linear GEMMs alone against their own multiply-add ratio (the ideal without attention's products, "
            "which do not shrink), and the share of the whole model's ideal speed-up it could reach if its Linear GEMMs "
            "shrank exactly by that ratio and everything else stayed as in the dense model (Amdahl):\n\n"
            + table(["model", "batch", "ideal", "Linear GEMM ideal", "GEMM speed-up", "GEMM share of its ideal", "reachable share of ideal"], bound_rows)
        )
    command = f"python benchmarks/latency.py --seq-len {args.seq_len} --repeats {args.repeats} --rounds {args.rounds} --ratios {args.ratios} --batch-sizes {args.batch_sizes}"
    command += f" --multiples {args.multiples}" if args.multiples != "1,8" else ""
    command += " --profile" if args.profile else ""
    command += f" --onnx-attention {args.onnx_attention}" if args.onnx_attention != "eager" else ""
    command += (f" --runtime {args.runtime}" if args.runtime != "torch" else "") + (f" --shape {args.shape}" if args.shape else "")
    command += f" --threads {args.threads}" if args.threads is not None else ""
    name = "latency" + (f"-{args.runtime}" if args.runtime != "torch" else "") + (f"-{args.shape}" if args.shape else "") + ("-profile" if args.profile else "")
    name += f"-{args.onnx_attention}-export" if args.onnx_attention != "eager" else ""
    name += f"-threads{args.threads}" if args.threads is not None else ""
    title = {"torch": "", "onnxruntime": " in onnxruntime", "compile": " in torch.compile", "compile-max": " in torch.compile, max-autotune"}[args.runtime]
    title += {"eager": "", "sdpa": ", attention exported as SDPA", "both": ", eager vs SDPA attention export"}[args.onnx_attention]
    title += f", {args.threads} intra-op thread{'s' if args.threads > 1 else ''}" if args.threads is not None else ""
    runtime_short = {"torch": "eager PyTorch", "onnxruntime": "onnxruntime", "compile": "torch.compile", "compile-max": "torch.compile max-autotune"}[args.runtime]
    headline = (
        f"{model_name}, {runtime_short}, sequence length {args.seq_len}, median of {args.rounds * args.repeats} runs. "
        "Share of ideal: the measured speed-up over the multiply-add ratio.\n\n" + table(header, rows)
    )
    write_section(
        name, f"Latency of compressed vs dense{title}{', ' + args.shape + ' shapes' if args.shape else ''} (issue 3e)", command, body,
        results="latency.md", headline=headline,
    )


if __name__ == "__main__":
    main()
