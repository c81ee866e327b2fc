"""Recovery at high compression (issue 32): plain + ft against two-stage distillation and gradual compression.

Per task, one `lowrank sweep` (a spec this script writes under benchmarks/runs/recovery/): each method at each
keep ratio, fine-tuned with every variant below. The dense model, its Fisher and each factorized model are
shared stages of the sweep, run once. Every choice (best epoch, + ft's start) reads the selection split held
out of the training rows; the table reports the task's dev split, scored once by the evaluate stages.
The per-task tables go to benchmarks/results/recovery.md, the summary over tasks into BENCHMARKS.md.

    .venv/bin/python benchmarks/recovery.py --tasks sst2,mrpc,stsb,rte --ratios 0.3,0.15
    .venv/bin/python benchmarks/recovery.py --variants plain-3,two-stage-8 --seed 43   # a second seed
    .venv/bin/python benchmarks/recovery.py --tasks stsb,rte --section recovery-seed42-stsb-rte   # beside an earlier run
"""

from __future__ import annotations

import argparse
import json
import statistics

from lowrank.io.files import read_json
from lowrank.pipeline import get_stage
from product import configurations, run_sweep
from quality import DEFAULT_TRAIN
from report import ROOT, table, write_section

RUNS = ROOT / "benchmarks" / "runs" / "recovery"
FT = "finetune_compressed"
TWO_STAGE = {f"{FT}.distill.enabled": True}  # the stage weights, temperature and KD weight are params.yaml's


def variants(ratio: float) -> dict[str, dict]:
    """One setting for all tasks; the total epochs of each are in its name. Gradual cuts at 0.5 (and 0.3) first."""
    cuts = [r for r in (0.5, 0.3) if r > ratio]
    return {
        "plain-3": {f"{FT}.epochs": 3, f"{FT}.distill.enabled": False},
        "two-stage-3": {**TWO_STAGE, f"{FT}.distill.intermediate.epochs": 1, f"{FT}.epochs": 2},
        "two-stage-8": {**TWO_STAGE, f"{FT}.distill.intermediate.epochs": 3, f"{FT}.epochs": 5},
        f"gradual-{len(cuts) + 6}": {**TWO_STAGE, f"{FT}.distill.intermediate.epochs": 2, f"{FT}.epochs": 4,
                                     f"{FT}.schedule": cuts, f"{FT}.schedule_epochs": 1},
    }


def spec(methods: list[str], ratios: list[float], chosen: list[str]) -> list[tuple[dict, dict]]:
    """(overrides, row labels) per configuration; `chosen` names variants by their prefix (plain, two-stage-8, gradual)."""
    out = []
    for method in methods:
        for ratio in ratios:
            for name, keys in variants(ratio).items():
                if not chosen or any(name.startswith(c) for c in chosen):
                    out.append(({"factorize.method": method, "factorize.keep_ratio": ratio, **keys},
                                {"method": method, "ratio": ratio, "variant": name}))
    return out


def task_rows(task: str, configs: list[tuple[dict, dict]], train: int, seed: int) -> tuple[float, list[dict]]:
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / "spec.json"
    path.write_text(json.dumps({"configs": [c for c, _ in configs]}))
    overrides = [f"data.task={task}", f"data.max_train_samples={train}", "evaluate.latency=false", f"{FT}.seed={seed}"]
    summary, _ = run_sweep(path, overrides, ["--workers", "1"])  # one job at a time: the seconds are compared
    rows = []
    for config, result, (_, label) in zip(configurations(path, overrides), summary["configs"], configs):
        run = read_json(get_stage(FT).metrics_path(config.layout))
        dense_selected = read_json(get_stage("finetune").metrics_path(config.layout))["best_score"]
        cut_seconds = sum(c["train_seconds"] for c in run.get("cuts", []))
        rows.append({
            **label, "task": task, "dense": result["scores"]["evaluate_dense"], "before": result["scores"]["evaluate_factorized"],
            "after": result["scores"]["evaluate_compressed"], "best_epoch": run["best_epoch"], "collapsed": run["collapsed"],
            "seconds": run["train_seconds"] + cut_seconds,
            # the selection split's share, which is what chooses the default among the variants (the dev split only reports)
            "kept_selection": run["best_score"] / dense_selected,
        })
    return rows[0]["dense"], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,mrpc,stsb,rte")
    parser.add_argument("--methods", default="tfwsvd")
    parser.add_argument("--ratios", default="0.3,0.15")
    parser.add_argument("--variants", default="", help="prefixes of the variants to run (default: all)")
    parser.add_argument("--seed", type=int, default=42, help="+ ft's seed (the dense model and the cuts stay the same)")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN)
    parser.add_argument("--section", default="", help="the results section to write (default: recovery-seed<seed>); "
                        "name another to add tasks beside a section already written")
    args = parser.parse_args()
    ratios = [float(v) for v in args.ratios.split(",")]
    configs = spec(args.methods.split(","), ratios, [v for v in args.variants.split(",") if v])
    detail, summary, done = [], [], []
    for task in args.tasks.split(","):  # the report is rewritten after each task, so a cut run keeps what finished
        dense, rows = task_rows(task, configs, args.train, args.seed)
        done.append(task)
        plain = {(r["method"], r["ratio"]): r["seconds"] for r in rows if r["variant"] == "plain-3"}
        detail.append(f"### {task.upper()} (dense {dense:.4f}, seed {args.seed})\n\n" + table(
            ["method", "keep ratio", "variant", "before + ft", "after", "kept of dense", "kept, selection split", "best epoch", "collapsed",
             "seconds", "x plain-3"],
            [[r["method"], r["ratio"], r["variant"], r["before"], r["after"], f"{r['after'] / dense:.1%}", f"{r['kept_selection']:.1%}", r["best_epoch"],
              "yes" if r["collapsed"] else "", f"{r['seconds']:.0f}",
              f"{r['seconds'] / plain[(r['method'], r['ratio'])]:.1f}" if (r["method"], r["ratio"]) in plain else ""] for r in rows],
        ))
        summary += [{**r, "kept": r["after"] / dense} for r in rows]
        report(args, done, summary, detail)


def report(args: argparse.Namespace, tasks: list[str], summary: list[dict], detail: list[str]) -> None:
    """Share of the dense score kept per task and on the mean, against the targets (98% at 0.3, 90% at 0.15)."""
    rows = []
    for key in dict.fromkeys((r["method"], r["ratio"], r["variant"]) for r in summary):
        group = [r for r in summary if (r["method"], r["ratio"], r["variant"]) == key]
        target = 0.98 if key[1] >= 0.3 else 0.90
        met = all(r["kept"] >= target for r in group) and len(group) == len(tasks)
        rows.append([*key, " / ".join(f"{r['kept']:.1%}" for r in group), f"{statistics.mean(r['kept'] for r in group):.1%}",
                     f"{target:.0%}: {'met' if met else 'not met'}", f"{statistics.mean(r['kept_selection'] for r in group):.1%}",
                     f"{statistics.mean(r['seconds'] for r in group):.0f}"])
    headline = (
        f"Share of the dense score kept after + ft on the dev split, per task ({' / '.join(t.upper() for t in tasks)}), "
        f"chosen on the selection split; the mean share on the selection split (what picks the default); + ft seed {args.seed}; "
        "mean seconds of + ft (cuts included):\n\n"
        + table(["method", "keep ratio", "variant (epochs in all)", "kept per task", "mean", "target", "mean, selection split", "s"], rows)
    )
    command = "python benchmarks/recovery.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != "")
    title = f"Recovery at high compression, seed {args.seed}, {' and '.join(t.upper() for t in tasks)} (issue 32)"
    write_section(args.section or f"recovery-seed{args.seed}", title, command,
                  headline + "\n\n" + "\n\n".join(detail), results="recovery.md", headline=headline)


if __name__ == "__main__":
    main()
