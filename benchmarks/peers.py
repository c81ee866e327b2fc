"""Benchmark (issue 21): SVD, FWSVD, TFWSVD, ASVD and SVD-LLM side by side, and the rank search against uniform ranks.

Per task, one `lowrank sweep` of benchmarks/specs/peers.yaml: every method at keep ratios 0.5 (before + ft),
0.3 and 0.15 (before and after 1 epoch of + ft). Then the two methods with the best mean score before + ft on
the selection split (+ ft's start, at 0.3 and 0.15) over the tasks (or those `--search` names, without the first
sweep) get a second sweep with `factorize.allocation: search` at 0.3 and 0.15, at exactly the uniform ranks' parameters, beside their uniform
configurations (the same store entries as the first sweep's). Its section also gives the search's seconds
against one epoch of the task's dense fine-tuning, the budget the search should stay under. One setting for
every task (params.yaml's); the store keeps every model, so a rerun only computes what is missing.

    .venv/bin/python benchmarks/peers.py --tasks sst2 mrpc stsb
    .venv/bin/python benchmarks/peers.py --search tfwsvd svd_llm   # the search section only
    .venv/bin/python benchmarks/peers.py --search tfwsvd svd_llm --seeds 42 43 --search-before --lpaf 0.5

`--seeds`: the uniform rows' + ft with each training seed (the spread between seeds); `--search-before`: the
search rows before + ft only; `--lpaf [RATIOS]`: LPAF with its defaults beside them (0.3 and 0.15 without RATIOS).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from lowrank.io.files import read_json
from lowrank.pipeline import get_stage
from product import PLAIN_FT, configurations, run_sweep

from report import ROOT, table, write_section

SPEC = ROOT / "benchmarks" / "specs" / "peers.yaml"
RUNS = ROOT / "benchmarks" / "runs" / "peers"


def _rows(spec: Path, overrides: list[str], summary: dict) -> list[dict]:
    """One row per configuration: method, allocation, ratio, reached, seconds of the solve (and the search), scores."""
    configs = configurations(spec, overrides)
    rows = []
    for config, result in zip(configs, summary["configs"]):
        lpaf = config.params.orchestration.path == "lpaf"  # before: pruned and factorized; after: mixed-rank fine-tuning
        cfg, info = config.params.factorize, read_json(get_stage("factorize_pruned" if lpaf else "factorize").metrics_path(config.layout))
        scores = result["scores"]
        rows.append({
            "method": "lpaf" if lpaf else cfg.method, "allocation": cfg.allocation, "keep_ratio": cfg.keep_ratio,
            "seed": config.params.finetune_compressed.seed,
            "reached": info["keep_ratio_reached"], "solve_s": info["solve_seconds"],
            "search_s": info.get("search_measure_seconds", 0) + info.get("search_solve_seconds", 0),
            "before": scores["evaluate_pruned_factorized" if lpaf else "evaluate_factorized"], "dense": scores["evaluate_dense"],
            "after": scores.get("evaluate_lpaf" if lpaf else "evaluate_compressed"),
            # the factorized model on the selection split (+ ft's epoch 0): what picks the methods to search, never "before"
            "before_selection": read_json(get_stage("finetune_compressed").metrics_path(config.layout))["start_score"]
            if config.params.orchestration.path == "factorize" else None,
            "epoch_s": read_json(get_stage("finetune").metrics_path(config.layout))["train_seconds"] / config.params.train.epochs,
        })
    return rows


def _sweep(task: str, spec: Path, train: int, workers: int | None) -> list[dict]:
    overrides = [f"data.task={task}", f"data.max_train_samples={train}", "evaluate.latency=false", "finetune_compressed.epochs=1", *PLAIN_FT]
    summary, _ = run_sweep(spec, overrides, ["--workers", str(workers)] if workers else [])
    return _rows(spec, overrides, summary)


def _search_spec(methods: list[str], lpaf: list[float], seeds: list[int], search_before: bool) -> Path:
    """The methods with uniform ranks (+ ft on each seed) and the search at 0.3 and 0.15; LPAF with its defaults at `lpaf`."""
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / "search.yaml"
    configs = [{"factorize.method": m, "factorize.keep_ratio": r, "finetune_compressed.seed": seed}
               for m in methods for r in (0.3, 0.15) for seed in seeds]
    configs += [{"factorize.method": m, "factorize.keep_ratio": r, "factorize.allocation": "search"}
                | ({"orchestration.path": "factorize_only"} if search_before else {}) for m in methods for r in (0.3, 0.15)]
    configs += [{"orchestration.path": "lpaf", "factorize.method": "sparse_tfwsvd", "factorize.keep_ratio": r} for r in lpaf]
    path.write_text(json.dumps({"configs": configs}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "stsb"])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--search", nargs="+", default=None, help="only the search section, for these methods")
    parser.add_argument("--lpaf", nargs="*", type=float, default=None, metavar="RATIO",
                        help="LPAF (prune, sparse TFWSVD, mixed-rank fine-tuning) in the search section, at these keep ratios (none: 0.3 0.15)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="search section: + ft seeds of the uniform rows")
    parser.add_argument("--search-before", action="store_true", help="search section: the search rows before + ft only")
    parser.add_argument("--section", default="peers-search", help="search section: its name in benchmarks/results/peers.md")
    args = parser.parse_args()
    args.lpaf = [] if args.lpaf is None else args.lpaf or [0.3, 0.15]

    best = args.search
    if best is None:
        rows = {task: _sweep(task, SPEC, args.train, args.workers) for task in args.tasks}
        peers_section(args, rows)
        methods = list(dict.fromkeys(r["method"] for r in rows[args.tasks[0]]))
        best = sorted(methods, key=lambda m: -mean(r["before_selection"] for t in args.tasks for r in rows[t]
                                                   if r["method"] == m and r["before_selection"] is not None))[:2]
    search = _search_spec(best, args.lpaf, args.seeds, args.search_before)
    rows = {task: _sweep(task, search, args.train, args.workers) for task in args.tasks}
    (RUNS / f"{args.section}-rows.json").write_text(json.dumps(rows, indent=1))
    search_section(args, best, rows)


def _not_run(value):
    return "not run" if value is None else value


def _group(r: dict) -> tuple:
    return (r["method"], r["allocation"], r["keep_ratio"], r["seed"])


def _order(group: tuple) -> tuple:
    """Larger keep ratios first, then by method, uniform ranks before the search, then by seed."""
    method, allocation, ratio, seed = group
    return (-ratio, method, allocation != "uniform", seed)


def _mean_rows(args: argparse.Namespace, rows: dict[str, list[dict]], cells) -> list[list]:
    """One row per (method, allocation, keep ratio, + ft seed), `cells(found)` over the tasks' rows of it."""
    keys = sorted({_group(r) for r in rows[args.tasks[0]]}, key=_order)
    return [[*key, *cells([r for t in args.tasks for r in rows[t] if _group(r) == key])] for key in keys]


def _after(found: list[dict]):
    afters = [r["after"] for r in found if r["after"] is not None]
    return mean(afters) if afters else "not run"


def peers_section(args: argparse.Namespace, rows: dict[str, list[dict]]) -> None:
    """Every method at every ratio, uniform ranks: the means over the tasks, then one table per task."""
    order = list(dict.fromkeys(r["method"] for r in rows[args.tasks[0]]))
    sections = []
    for task in args.tasks:
        body = table(["method", "keep ratio", "reached", "solve s", "score", "score + ft"],
                     [[r["method"], r["keep_ratio"], r["reached"], r["solve_s"], r["before"], _not_run(r["after"])]
                      for r in sorted(rows[task], key=lambda r: (-r["keep_ratio"], order.index(r["method"])))])
        sections.append(f"### {task.upper()} (dense {rows[task][0]['dense']:.4f})\n\n{body}")
    means = table(["method", "allocation", "keep ratio", "+ ft seed", "mean score", "mean score + ft", "mean solve s"], _mean_rows(
        args, rows, lambda found: [mean(r["before"] for r in found), _after(found), mean(r["solve_s"] for r in found)]))
    dense = mean(rows[t][0]["dense"] for t in args.tasks)
    intro = (f"all-MiniLM-L6-v2 fine-tuned on {args.train} training examples per task (params.yaml), the input statistics and Fisher over "
             f"the same examples, scored on the full dev sets; every epoch chosen on the selection split (data.validation, held out of the "
             f"training rows), never on the dev split reported; STS-B's score is the mean of Pearson and Spearman. + ft: 1 epoch. "
             f"Mean dense score over {', '.join(args.tasks)}: {dense:.4f}.")
    write_section(
        "peers", "Peer methods: ASVD and SVD-LLM beside SVD, FWSVD, TFWSVD (issue 21)",
        f"python benchmarks/peers.py --tasks {' '.join(args.tasks)} --train {args.train}",
        intro + "\n\n### Mean over the tasks\n\n" + means + "\n\n" + "\n\n".join(sections), results="peers.md",
    )


def search_section(args: argparse.Namespace, methods: list[str], rows: dict[str, list[dict]]) -> None:
    """Uniform ranks against the search, per method and ratio; the search's seconds against one dense epoch."""
    sections = []
    for task in args.tasks:
        body = table(["method", "keep ratio", "allocation", "+ ft seed", "score", "score + ft", "solve s", "search s", "one epoch s"],
                     [[r["method"], r["keep_ratio"], r["allocation"], r["seed"], r["before"], _not_run(r["after"]), r["solve_s"], r["search_s"],
                       f"{r['epoch_s']:.0f}"] for r in sorted(rows[task], key=lambda r: _order(_group(r)))])
        sections.append(f"### {task.upper()} (dense {rows[task][0]['dense']:.4f})\n\n{body}")
    under = sum(r["search_s"] < r["epoch_s"] for t in args.tasks for r in rows[t] if r["allocation"] == "search")
    lpaf = " LPAF: taylor pruning during fine-tuning, sparse TFWSVD, mixed-rank fine-tuning (params.yaml's defaults); its score is after pruning and factorizing, its + ft after mixed-rank fine-tuning." if args.lpaf else ""
    runs = sum(r["allocation"] == "search" for t in args.tasks for r in rows[t])
    means = table(["method", "allocation", "keep ratio", "+ ft seed", "mean score", "mean score + ft", "mean search s"], _mean_rows(
        args, rows, lambda found: [mean(r["before"] for r in found), _after(found), mean(r["search_s"] for r in found)]))
    intro = (f"{', '.join(methods)} with `factorize.allocation: search` against uniform ranks at the same parameter count, "
             f"{args.train} training examples per task, + ft 1 epoch; search settings {json.dumps(search_params())}. "
             f"The search took less than one epoch of the task's dense fine-tuning in {under} of {runs} runs.{lpaf}")
    write_section(
        args.section, "The rank search against uniform ranks" + (", and LPAF" if args.lpaf else "") + (", two seeds" if len(args.seeds) > 1 else "") + " (issue 21)",
        f"python benchmarks/peers.py --tasks {' '.join(args.tasks)} --train {args.train} --search {' '.join(methods)} "
        f"--seeds {' '.join(map(str, args.seeds))}" + " --search-before" * args.search_before + (f" --lpaf {' '.join(map(str, args.lpaf))}" if args.lpaf else "")
        + f" --section {args.section}" * (args.section != "peers-search"),
        intro + "\n\n### Mean over the tasks\n\n" + means + "\n\n" + "\n\n".join(sections), results="peers.md",
    )


def search_params() -> dict:
    """The search settings every configuration used (params.yaml's)."""
    from lowrank.config import load_params

    cfg = load_params("params.yaml").factorize
    return {"search_samples": cfg.search_samples, "search_points": cfg.search_points, "min_rank_share": cfg.min_rank_share,
            "search_max_share": cfg.search_max_share}


if __name__ == "__main__":
    main()
