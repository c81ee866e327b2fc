"""Benchmark (issue 3a): weighted objective and time of each factorizer on real MiniLM matrices.

Needs the default pipeline's fine-tuned model and Fisher (`make run`, or
`lowrank stage fisher`). For one matrix of each type (block `--block`) and
each keep ratio, runs svd, fwsvd, the paper's Adam-then-SGD (from plain SVD,
switching below FWSVD's objective) and ALS, all side by side in one process,
and records when ALS first reaches Adam_SGD's final objective.

    .venv/bin/python benchmarks/solvers.py [--adam-steps 50000] [--types query,attention_output]
"""

from __future__ import annotations

import argparse
import time

import torch

from lowrank.io.checkpoints import load_compressed
from lowrank.train.importance import load_importance
from lowrank.modules.matching import find_targets, matrix_type
from lowrank.linalg.solvers import get_solver, weighted_error

from report import table, write_section


def rank_for(shape: tuple[int, int], keep_ratio: float) -> int:
    out_features, in_features = shape
    return max(1, int(keep_ratio * out_features * in_features / (out_features + in_features)))


def timed(name: str, weight, rank, importance, **options):
    """(factors, seconds, [(seconds since start, error)]) of one solver run."""
    trace: list[tuple[float, float]] = []
    started = time.perf_counter()
    if "steps" in options:
        options["callback"] = lambda step, error: trace.append((time.perf_counter() - started, error))
    a, b = get_solver(name)(weight, rank, importance=importance, **options)
    return (a, b), time.perf_counter() - started, trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="artifacts/finetune/model")
    parser.add_argument("--fisher", default="artifacts/fisher/fisher.safetensors")
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--ratios", default="0.5,0.3,0.15")
    parser.add_argument("--types", default="query,key,value,attention_output,ffn_in,ffn_out")
    parser.add_argument("--adam-steps", type=int, default=50_000)
    parser.add_argument("--als-steps", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = load_compressed(args.model)
    fisher = load_importance(args.fisher).scores
    modules = dict(model.named_modules())
    wanted = args.types.split(",")
    names = [n for n in find_targets(model) if f".{args.block}." in n and matrix_type(n) in wanted]
    rows = []
    for name in names:
        weight = modules[name].weight.detach()
        importance = fisher[name]
        for ratio in map(float, args.ratios.split(",")):
            rank = rank_for(tuple(weight.shape), ratio)
            results = {}
            for solver, options in (
                ("svd", {}),
                ("fwsvd", {}),
                ("adam_sgd", {"steps": args.adam_steps, "init": "svd"}),
                ("als", {"steps": args.als_steps, "tol": 0.0}),
            ):
                (a, b), seconds, trace = timed(solver, weight, rank, importance, **options)
                results[solver] = (weighted_error(weight, a, b, importance), seconds, trace, weighted_error(weight, a, b))
            adam_error, adam_seconds = results["adam_sgd"][0], results["adam_sgd"][1]
            reach = next((t for t, e in results["als"][2] if e <= adam_error), None)
            svd_error = results["svd"][0]
            rows.append(
                [
                    f"{matrix_type(name)} {tuple(weight.shape)}", ratio, rank,
                    *(results[s][0] / svd_error for s in ("fwsvd", "adam_sgd", "als")),
                    *(results[s][1] for s in ("svd", "fwsvd", "adam_sgd", "als")),
                    "never" if reach is None else f"{reach:.3g} s ({adam_seconds / reach:.0f}x sooner)",
                    results["als"][3] / results["svd"][3],
                ]
            )
            print(rows[-1], flush=True)
    header = [
        "matrix", "keep", "rank", "J fwsvd / svd", "J adam_sgd / svd", "J als / svd",
        "s svd", "s fwsvd", "s adam_sgd", "s als", "ALS reaches adam_sgd's final J at", "plain MSE als / svd",
    ]
    body = (
        f"Block {args.block} of all-MiniLM-L6-v2 fine-tuned on the default SST-2 subset, with its Fisher from the "
        f"pipeline. J is the Fisher-weighted squared error (lower is better), shown relative to plain SVD's. "
        f"adam_sgd: {args.adam_steps} steps from plain SVD, Adam until J drops below FWSVD's, then gradient descent "
        f"with backtracking (the paper's Adam_SGD). als: {args.als_steps} alternating weighted least-squares sweeps "
        f"from FWSVD. Times are wall-clock seconds on one process, measured one after the other.\n\n"
        + table(header, rows)
    )
    command = "python benchmarks/solvers.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("model", "fisher")
    )
    title = f"Solvers, Adam_SGD at {args.adam_steps} steps: weighted objective and time (issue 3a)"
    headline = (
        f"J: the Fisher-weighted squared error relative to plain SVD's (lower is better); s: seconds. adam_sgd: {args.adam_steps} "
        f"steps from plain SVD; als: {args.als_steps} sweeps from FWSVD.\n\n"
        + table(
            ["matrix", "keep", "J fwsvd / svd", "J adam_sgd / svd", "J als / svd", "s adam_sgd", "s als", "ALS reaches adam_sgd's final J at"],
            [[row[0], row[1], row[3], row[4], row[5], row[8], row[9], row[10]] for row in rows],
        )
    )
    write_section(f"solvers-{args.adam_steps}", title, command, body, results="solvers.md", headline=headline)


if __name__ == "__main__":
    main()
