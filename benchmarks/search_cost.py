"""Benchmark (issue 21): what the rank search's measurement costs, before and after its speed-ups, side by side.

Reads the dense model, its input statistics and the prepared data that a `lowrank sweep` (peers.py) left in
the store for `--task`, and times the measurement of the factorize stage's search (`rank_search.measure`,
every targeted matrix at every grid rank) for SVD-LLM at keep ratio 0.3 four ways in one process: the first
search's settings (64 calibration examples, 5 ranks per matrix, every forward from the embeddings), the same
with the recorded block outputs replayed, the second search's (32 examples, 4 ranks, replayed), and today's
defaults (3 ranks, the uniform one among them; each matrix factorized once and truncated). Also checks that
replaying gives the same loss increases, and how far truncating moves them.

    .venv/bin/python benchmarks/search_cost.py --task sst2
"""

from __future__ import annotations

import argparse
import time

from lowrank.api import factorizer, target_names
from lowrank.config import load_params
from lowrank.io.checkpoints import load_compressed
from lowrank.linalg.ranks import allocate_ranks

from lowrank.modules.surgery import dense_weights
from lowrank.pipeline import Layout, get_stage
from lowrank.pipeline.factorize import calibration_loss
from lowrank.pipeline.plan import path_stages
from lowrank.pipeline.prepared import PreparedData
from lowrank.pipeline.store import fingerprints
from lowrank.train.importance import load_importance
from lowrank.train.rank_search import measure, search_grids

from report import table, write_section

SETTINGS = {  # label: (calibration examples, grid points, replay, nested)
    "first search: 64 examples, 5 ranks, full forwards": (64, 5, False, False),
    "64 examples, 5 ranks, blocks replayed": (64, 5, True, False),
    "second search: 32 examples, 4 ranks, replayed": (32, 4, True, False),
    "today's defaults: 32 examples, 3 ranks, replayed, one factorization per matrix": (32, 3, True, True),
}

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    args = parser.parse_args()
    params = load_params("params.yaml", [f"data.task={args.task}", f"data.max_train_samples={args.train}",
                                         "factorize.method=svd_llm", f"factorize.keep_ratio={args.keep_ratio}"])
    layout = Layout.from_params(params, fingerprints(params, path_stages("factorize_only")))
    dense = get_stage("finetune").output_paths(layout)["model"]
    stats = get_stage("fisher").output_paths(layout)["importance"]
    data = PreparedData.open(get_stage("prepare").output_paths(layout)["data"])
    if not dense.exists():
        raise SystemExit(f"no dense model at {dense}: run benchmarks/peers.py --task {args.task} first (same code version)")
    model = load_compressed(dense).eval()
    cfg = params.factorize
    names = target_names(model, cfg.targets, cfg.exclude)
    weights = dense_weights(model, names)
    gram = load_importance(stats / "gram.safetensors").scores
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    uniform = allocate_ranks(shapes, cfg.keep_ratio, "uniform", cfg.rank_multiple)
    method = factorizer(cfg)  # svd_llm, with its options
    factorize = lambda n, r: method(weights[n], r, importance=gram[n])  # noqa: E731

    rows, seconds, results, first = [], {}, {}, next(iter(SETTINGS))
    for label, (samples, points, replay, nested) in SETTINGS.items():
        loss_fn = calibration_loss(data, samples, params.fisher.batch_size, params.data.seed)
        _, grids = search_grids({n: uniform[n] for n in names}, shapes, cfg.min_rank_share, cfg.search_max_share, points, cfg.rank_multiple)
        started = time.perf_counter()
        base, increases = measure(model, names, grids, factorize, loss_fn, replay=replay, nested=nested)
        seconds[label] = time.perf_counter() - started
        results[(samples, points, replay, nested)] = increases
        rows.append([label, sum(len(g) for g in grids.values()), f"{seconds[label]:.1f}", f"{seconds[first] / seconds[label]:.2f}x"])
    same = results[(64, 5, True, False)] == results[(64, 5, False, False)]
    second, today = results[(32, 4, True, False)], results[(32, 3, True, True)]
    moved = max(abs(today[n][r] - second[n][r]) for n in today for r in today[n] if r in second[n])
    body = (f"{args.task.upper()}, {args.train} training examples, SVD-LLM at keep ratio {args.keep_ratio}: seconds of the search's "
            f"measurement (every targeted matrix at every grid rank), one process, one after the other. Replaying the blocks gave "
            f"{'the same' if same else 'DIFFERENT'} loss increases as the full forwards; at the ranks both measured, truncating one "
            f"factorization moved the loss increases by at most {moved:.2g} from factorizing at each rank.\n\n"
            + table(["setting", "measurements", "seconds", "speed-up over the first"], rows))
    write_section(f"search-cost-{args.task}", "What the rank search's measurement costs (issue 21)",
                  f"python benchmarks/search_cost.py --task {args.task}", body, results="peers.md")
    print(body)

if __name__ == "__main__":
    main()
