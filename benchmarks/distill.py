"""+ ft with and without the dense teacher (issue 23): does distillation keep compressed models from collapsing?

For each task: the dense model, its Fisher, then TFWSVD and SVD at each keep
ratio, each fine-tuned for `--epochs` with no distillation, with logit
distillation, and with logits and hidden states. Every stage is the
product's (`product.call_stage`); a run's metrics file is its cache, in the
task's runs folder. The full tables go to benchmarks/results/distill.md, the
summary over tasks into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
from pathlib import Path

from lowrank.config import DistillationConfig, load_params
from product import cached, call_stage, dense_runs
from quality import DEFAULT_TRAIN, runs_folder
from report import add_threads_option, apply_threads, table, write_section

VARIANTS = {  # one setting for all tasks: (distillation, learning rate; None: params.yaml's)
    "none": (DistillationConfig(enabled=False), None),
    "logits": (DistillationConfig(enabled=True, temperature=2.0, weight=0.5), None),
    "logits+hidden": (DistillationConfig(enabled=True, temperature=2.0, weight=0.5, hidden_weight=1.0), None),
}


def lr_variants(lrs: list[float], warmups: list[float]) -> dict[str, tuple[DistillationConfig, float, float]]:
    """Plain + ft at other learning rates and warm-ups: `--lrs`, `--warmups`."""
    return {f"lr {lr:g}, warm-up {w:g}": (DistillationConfig(enabled=False), lr, w) for lr in lrs for w in warmups}


def _slug(variant: str) -> str:
    return variant.replace(", ", "-").replace(" ", "")


def task_rows(task: str, methods: list[str], ratios: list[float], epochs: float, train: int, variants: dict) -> tuple[float, float, list[dict]]:
    out = runs_folder(task, train)
    base = load_params("params.yaml", [f"data.task={task}", f"data.max_train_samples={train}", "evaluate.latency=false"])
    data, dense, fisher, metrics = dense_runs(out, base)

    def evaluate(model: Path, path: Path) -> dict:
        return cached(path, lambda: call_stage("evaluate_dense", base, path, {"model": model, "data": data}))

    dense_score = evaluate(dense, metrics / "evaluate_dense.json")["task"]["score"]
    rows = []
    for method in methods:
        for ratio in ratios:
            tag = f"{method}-{ratio}"
            model = out / "distill" / tag / "model"
            factorize = dataclasses.replace(base.factorize, method=method, keep_ratio=ratio)
            runs = [metrics / f"distill-{tag}.eval.json"] + [metrics / f"distill-{tag}-ft{epochs:g}-{_slug(v)}.json" for v in variants]
            if not all(path.is_file() for path in runs) and not model.exists():
                call_stage("factorize", dataclasses.replace(base, factorize=factorize), metrics / f"distill-{tag}.factorize.json",
                           {"model": dense, "importance": fisher}, {"model": model})
            before = evaluate(model, metrics / f"distill-{tag}.eval.json")["task"]["score"]
            for variant, (distill, lr, *warmup) in variants.items():
                default = base.finetune_compressed
                ft = dataclasses.replace(default, epochs=epochs, distill=distill, lr=lr or default.lr,
                                         warmup_ratio=warmup[0] if warmup else default.warmup_ratio)
                name = f"distill-{tag}-ft{epochs:g}-{_slug(variant)}"
                tuned = out / "distill" / name / "model"
                run = cached(metrics / f"{name}.json", lambda: call_stage(
                    "finetune_compressed", dataclasses.replace(base, finetune_compressed=ft), metrics / f"{name}.json",
                    {"model": model, "teacher": dense, "data": data}, {"model": tuned}))
                rows.append({
                    "task": task, "method": method, "ratio": ratio, "variant": variant, "before": before,
                    "after": run["best_score"], "best_epoch": run["best_epoch"], "collapsed": run["collapsed"],
                    "majority": run["majority_score"], "last": run["history"][-1]["score"],
                    "epoch_s": run["train_seconds"] / epochs,
                })
                shutil.rmtree(tuned.parent, ignore_errors=True)
            shutil.rmtree(model.parent, ignore_errors=True)
    return dense_score, base.finetune_compressed.lr, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="sst2,mrpc,stsb")
    parser.add_argument("--methods", default="tfwsvd,svd")
    parser.add_argument("--ratios", default="0.3,0.15")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN)
    parser.add_argument("--lrs", default=None, help="instead of the distillation variants: plain + ft at these learning rates")
    parser.add_argument("--warmups", default="0.1", help="with --lrs: these warm-up ratios")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    methods, ratios = args.methods.split(","), [float(r) for r in args.ratios.split(",")]
    variants = VARIANTS if args.lrs is None else lr_variants(
        [float(v) for v in args.lrs.split(",")], [float(v) for v in args.warmups.split(",")])
    detail, summary, done = [], [], []
    for task in args.tasks.split(","):  # the report is rewritten after each task, so a cut run keeps what finished
        dense, lr, rows = task_rows(task, methods, ratios, args.epochs, args.train, variants)
        done.append(task)
        detail.append(f"### {task.upper()} (dense {dense:.4f}, + ft lr {lr:g} unless the row says)\n\n" + table(
            ["method", "keep ratio", "variant", "before + ft", "after (best epoch)", "last epoch", "kept of dense", "collapsed", "s / epoch"],
            [[r["method"], r["ratio"], r["variant"], r["before"], f"{r['after']:.4f} ({r['best_epoch']})", r["last"],
              f"{r['after'] / dense:.1%}", "yes" if r["collapsed"] else "", f"{r['epoch_s']:.0f}"] for r in rows],
        ))
        summary += [{**r, "kept": r["after"] / dense} for r in rows]
        report(args, methods, ratios, list(variants), done, summary, detail)


def report(args: argparse.Namespace, methods: list[str], ratios: list[float], variants: list[str], tasks: list[str],
           summary: list[dict], detail: list[str]) -> None:
    """The summary over the tasks run so far into BENCHMARKS.md, the per-task tables into benchmarks/results/distill.md."""
    headline_rows = []
    for method in methods:
        for ratio in ratios:
            cells, seconds, below = [], [], 0
            for variant in variants:
                group = [r for r in summary if (r["method"], r["ratio"], r["variant"]) == (method, ratio, variant)]
                cells.append(" / ".join(f"{r['kept']:.1%}" for r in group))
                seconds.append(f"{statistics.mean(r['epoch_s'] for r in group):.0f}")
                below += sum(r["after"] < r["before"] - 1e-9 or r["collapsed"] for r in group)
            headline_rows.append([method, ratio, *cells, below, " / ".join(seconds)])
    headline = (
        f"+ ft for {args.epochs:g} epoch(s): the share of the dense score kept, per task ({' / '.join(t.upper() for t in tasks)}); "
        "runs that ended below their score before + ft or collapsed to the majority class; seconds per epoch, per variant:\n\n"
        + table(["method", "keep ratio", *variants, "below start / collapsed", "s / epoch"], headline_rows)
    )
    command = "python benchmarks/distill.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None)
    name, title = ("distill-ft", "+ ft with the dense teacher (issue 23)") if args.lrs is None else ("ft-lr", "The learning rate of + ft (issue 23)")
    # the learning-rate runs keep their detail only: BENCHMARKS.md quotes them in section 7's words
    write_section(name, title, command, headline + "\n\n" + "\n\n".join(detail), results="distill.md",
                  headline=headline, add_headline=args.lrs is None)


if __name__ == "__main__":
    main()
