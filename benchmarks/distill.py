"""+ ft with and without the dense teacher (issue 23): does distillation keep compressed models from collapsing?

Per task, one `lowrank sweep` (a spec this script writes under benchmarks/runs/distill/): TFWSVD and SVD at
each keep ratio, fine-tuned for each of `--epochs` with no distillation, with logit distillation, and with
logits and hidden states (`--svd-epochs` limits SVD's rows, the comparison, to fewer budgets); with
`--warmups`, plain + ft of TFWSVD at the most compressed ratio at other warm-ups. The dense model, its Fisher
and each factorized model are shared stages of the sweep, run once and kept in the store. The full tables go
to benchmarks/results/distill.md, headed by the summary over tasks (BENCHMARKS.md, section 2, copies it).

    .venv/bin/python benchmarks/distill.py --tasks sst2,mrpc,stsb --epochs 1,3 --svd-epochs 1 --warmups 0,0.3
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

RUNS = ROOT / "benchmarks" / "runs" / "distill"
ONE_STAGE = {"finetune_compressed.distill.enabled": True, "finetune_compressed.distill.intermediate.epochs": 0}  # no stage 1: issue 23's setting
VARIANTS = {  # one setting for all tasks; the teacher's temperature and weight are params.yaml's
    "none": {"finetune_compressed.distill.enabled": False},
    "logits": {**ONE_STAGE, "finetune_compressed.distill.hidden_weight": 0.0},
    "logits+hidden": {**ONE_STAGE, "finetune_compressed.distill.hidden_weight": 1.0},
}


def spec(methods: list[str], ratios: list[float], epochs: list[float], svd_epochs: list[float], warmups: list[float],
         lrs: list[float]) -> list[tuple[dict, dict]]:
    """(overrides, row labels) per configuration."""
    out = []
    for method in methods:
        for ratio in ratios:
            for ep in svd_epochs if method == "svd" else epochs:
                for variant, keys in VARIANTS.items():
                    out.append(({"factorize.method": method, "factorize.keep_ratio": ratio, "finetune_compressed.epochs": ep, **keys},
                                {"method": method, "ratio": ratio, "epochs": ep, "variant": variant}))
    extra = [("warmup_ratio", "warm-up", w) for w in warmups] + [("lr", "lr", lr) for lr in lrs]
    for key, name, value in extra:  # plain + ft of the first method at the most compressed ratio, the shortest budget
        out.append(({"factorize.method": methods[0], "factorize.keep_ratio": min(ratios), "finetune_compressed.epochs": epochs[0],
                     f"finetune_compressed.{key}": value, **VARIANTS["none"]},
                    {"method": methods[0], "ratio": min(ratios), "epochs": epochs[0], "variant": f"none, {name} {value:g}"}))
    return out


def task_rows(task: str, configs: list[tuple[dict, dict]], train: int) -> tuple[float, list[dict]]:
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / "spec.json"
    path.write_text(json.dumps({"configs": [c for c, _ in configs]}))
    overrides = [f"data.task={task}", f"data.max_train_samples={train}", "evaluate.latency=false"]
    summary, _ = run_sweep(path, overrides, ["--workers", "1"])  # one job at a time: the epochs are timed
    planned = configurations(path, overrides)
    rows = []
    for config, result, (_, label) in zip(planned, summary["configs"], configs):
        run = read_json(get_stage("finetune_compressed").metrics_path(config.layout))
        rows.append({
            **label, "task": task, "before": result["scores"]["evaluate_factorized"], "dense": result["scores"]["evaluate_dense"],
            # the reported split, scored once by the evaluate stage; the run's own scores (best, last epoch, majority class)
            # are on the selection split that chose the epoch
            "after": result["scores"]["evaluate_compressed"], "best_epoch": run["best_epoch"], "collapsed": run["collapsed"],
            "selected": run["best_score"], "majority": run["majority_score"], "last": run["history"][-1]["score"],
            "epoch_s": run["train_seconds"] / label["epochs"],
        })
    return rows[0]["dense"], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,mrpc,stsb")
    parser.add_argument("--methods", default="tfwsvd,svd")
    parser.add_argument("--ratios", default="0.3,0.15")
    parser.add_argument("--epochs", default="1", help="+ ft budgets, e.g. 1,3")
    parser.add_argument("--svd-epochs", default=None, help="SVD's budgets (default: --epochs)")
    parser.add_argument("--warmups", default="", help="plain + ft of the first method at the smallest ratio at these warm-ups")
    parser.add_argument("--lrs", default="", help="... and at these learning rates")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN)
    args = parser.parse_args()
    floats = lambda text: [float(v) for v in text.split(",") if v]  # noqa: E731
    methods, ratios, epochs = args.methods.split(","), floats(args.ratios), floats(args.epochs)
    configs = spec(methods, ratios, epochs, floats(args.svd_epochs or args.epochs), floats(args.warmups), floats(args.lrs))
    detail, summary, done = [], [], []
    for task in args.tasks.split(","):  # the report is rewritten after each task, so a cut run keeps what finished
        dense, rows = task_rows(task, configs, args.train)
        done.append(task)
        detail.append(f"### {task.upper()} (dense {dense:.4f}; selection split: majority class {rows[0]['majority']:.4f})\n\n" + table(
            ["method", "keep ratio", "epochs", "variant", "before + ft", "after", "kept of dense",
             "selection: best (epoch), last epoch", "collapsed", "s / epoch"],
            [[r["method"], r["ratio"], r["epochs"], r["variant"], r["before"], r["after"], f"{r['after'] / dense:.1%}",
              f"{r['selected']:.4f} ({r['best_epoch']}), {r['last']:.4f}", "yes" if r["collapsed"] else "", f"{r['epoch_s']:.0f}"] for r in rows],
        ))
        summary += [{**r, "kept": r["after"] / dense} for r in rows]
        report(args, done, summary, detail)


def report(args: argparse.Namespace, tasks: list[str], summary: list[dict], detail: list[str]) -> None:
    """The summary over the tasks run so far, then the per-task tables, into benchmarks/results/distill.md."""
    headline_rows = []
    for key in dict.fromkeys((r["method"], r["ratio"], r["epochs"]) for r in summary if r["variant"] in VARIANTS):
        cells, seconds, below = [], [], 0
        for variant in VARIANTS:
            group = [r for r in summary if (r["method"], r["ratio"], r["epochs"], r["variant"]) == (*key, variant)]
            cells.append(" / ".join(f"{r['kept']:.1%}" for r in group))
            seconds.append(f"{statistics.mean(r['epoch_s'] for r in group):.0f}")
            below += sum(r["after"] < r["before"] - 1e-9 or r["collapsed"] for r in group)
        headline_rows.append([*key, *cells, below, " / ".join(seconds)])
    headline = (
        "Every epoch chosen on the selection split (data.validation), every score on the task's dev split. "
        f"The share of the dense score kept after + ft, per task ({' / '.join(t.upper() for t in tasks)}); "
        "runs that ended below their score before + ft or collapsed to the majority class; seconds per epoch, per variant:\n\n"
        + table(["method", "keep ratio", "epochs", *VARIANTS, "below start / collapsed", "s / epoch"], headline_rows)
    )
    command = "python benchmarks/distill.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v)
    write_section("distill-ft", "+ ft with the dense teacher (issue 23)", command, headline + "\n\n" + "\n\n".join(detail),
                  results="distill.md", headline=headline)


if __name__ == "__main__":
    main()
