"""Benchmark (issue 24): does fine-tuning on length-grouped batches cost the dense model its score?

`data.group_by_length` halved `make run` on SST-2 with its score within 0.5 points; this checks the other tasks
and a second seed. Per task, one `lowrank sweep` of the dense path (prepare, finetune, evaluate_dense) over
`data.group_by_length` true and false and `--seeds` training seeds; the table gives the dev score and the
seconds per epoch of each.

    .venv/bin/python benchmarks/grouping.py --tasks sst2 mrpc stsb --seeds 42 43
"""

from __future__ import annotations

import argparse
import json
from statistics import mean

from lowrank.io.files import read_json
from lowrank.pipeline import get_stage
from product import configurations, run_sweep

from report import ROOT, table, write_section

RUNS = ROOT / "benchmarks" / "runs" / "grouping"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "stsb"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43])
    parser.add_argument("--train", type=int, default=2000)
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    spec = RUNS / "spec.json"
    spec.write_text(json.dumps({"grid": {"data.group_by_length": [True, False], "train.seed": args.seeds}}))

    rows, means = [], []
    for task in args.tasks:
        overrides = [f"data.task={task}", f"data.max_train_samples={args.train}", "orchestration.path=dense", "evaluate.latency=false"]
        run_sweep(spec, overrides, ["--workers", "1"])  # one job at a time: the epochs are timed
        configs = configurations(spec, overrides)
        found = {}
        for config in configs:
            score = read_json(get_stage("evaluate_dense").metrics_path(config.layout))["task"]["score"]
            train = read_json(get_stage("finetune").metrics_path(config.layout))
            found[(config.params.data.group_by_length, config.params.train.seed)] = (score, train["train_seconds"] / config.params.train.epochs)
        for seed in args.seeds:
            (on, on_s), (off, off_s) = found[(True, seed)], found[(False, seed)]
            rows.append([task.upper(), seed, off, on, f"{100 * (on - off):+.2f}", f"{off_s:.0f}", f"{on_s:.0f}", f"{on_s / off_s:.2f}"])
        on, off = mean(found[(True, s)][0] for s in args.seeds), mean(found[(False, s)][0] for s in args.seeds)
        spread = max(abs(found[(True, s)][0] - found[(True, t)][0]) for s in args.seeds for t in args.seeds)
        means.append([task.upper(), off, on, f"{100 * (on - off):+.2f}", f"{100 * spread:.2f}"])
    body = (f"The dense model fine-tuned on {args.train} training examples (params.yaml: 3 epochs, batch 32), ungrouped against "
            "grouped, on the same seed; dev score (STS-B: mean of Pearson and Spearman) and the fine-tuning's seconds per epoch.\n\n"
            + table(["task", "seed", "ungrouped", "grouped", "grouped - ungrouped (points)", "s / epoch ungrouped", "s / epoch grouped", "time ratio"], rows)
            + "\n\nMean over the seeds, and the spread between the grouped seeds:\n\n"
            + table(["task", "ungrouped", "grouped", "difference (points)", "seed spread, grouped (points)"], means))
    write_section("grouping", "Length-grouped batches and the dense score (issue 24)",
                  f"python benchmarks/grouping.py --tasks {' '.join(args.tasks)} --seeds {' '.join(map(str, args.seeds))}",
                  body, results="grouping.md", headline=body)


if __name__ == "__main__":
    main()
