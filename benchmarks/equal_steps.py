"""Benchmark (issue 4): LPAF against TFWSVD + ft at equal training steps, pooled over seeds.

One seed's dev score moves by a point or more with the training seed alone, so
the issue's target (LPAF at or above TFWSVD + ft) is judged over several. This
script trains nothing: it reads the summaries `benchmarks/lpaf_ablations.py` leaves in
each of its run folders, keeps those that found a + ft run with as many epochs,
the same seed and the same learning rate (`quality.py --ft-epochs N --ft-seed S
--ft-lr LR`), and tabulates them per setting, with the mean over seeds.

    .venv/bin/python benchmarks/quality.py --task sst2 --ft-epochs 5 --ft-ratios 0.15 --ft-methods tfwsvd --ft-seed 43
    .venv/bin/python benchmarks/lpaf_ablations.py --task sst2 --ratios 0.15 --prune-epochs 3 --mrft-epochs 2 --ablations none --seed 43
    .venv/bin/python benchmarks/equal_steps.py --task sst2
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from lpaf_ablations import LEGACY_PRUNED_WEIGHT, PULL_LABELS
from quality import DEFAULT_TRAIN, runs_folder, train_phrase, train_suffix
from report import results_file, table, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="training subset the runs used")
    parser.add_argument("--runs", default=None, help="the benchmarks' folder (default benchmarks/runs/TASK, or TASK-trainN for another --train)")
    parser.add_argument("--section", default=None,
                        help="its section in the results file (default equal-steps-TASK-RATIO): another name keeps the pooled table of runs made elsewhere")
    args = parser.parse_args()

    runs = Path(args.runs) if args.runs else runs_folder(args.task, args.train)
    groups: dict[tuple, list[tuple[int, float, float]]] = defaultdict(list)
    for path in sorted(runs.glob("lpaf-*/summary-*.json")):
        summary = json.loads(path.read_text())
        # (LPAF, TFWSVD + ft at LPAF's epochs) after fine-tuning; a run without such a + ft run has None
        for ratio, lpaf, tfwsvd in summary["pairs"]:
            if ratio != args.ratio or tfwsvd is None:
                continue
            weight = summary.get("pruned_weight", LEGACY_PRUNED_WEIGHT)  # summaries from before the key
            key = (summary["prune_method"], summary["prune_epochs"], summary["mrft_epochs"], summary["density_factor"], weight,
                   summary["prune_distill"], summary.get("rank_pull", 0.0), summary.get("rank_pull_importance", "none"), summary.get("start_from", "finetuned"), summary["lr"],
                   summary.get("mrft_distill", True))  # summaries from before the key distilled, params.yaml's default
            groups[key].append((summary["seed"], lpaf, tfwsvd))
    if not groups:
        raise SystemExit(f"{runs}: no lpaf_ablations.py summary at keep ratio {args.ratio} with a + ft run of as many epochs (see --help)")

    rows, means = [], []
    for (method, prune, mrft, factor, weight, distill, pull, importance, start, lr, mrft_distill), seeds in sorted(groups.items()):
        extras = [
            "distillation while pruning" if distill else "",
            f"{PULL_LABELS[importance]} rank pull {pull:g}" if pull else "",
            "from the pretrained model" if start == "pretrained" else "",
            "" if mrft_distill else "mixed-rank fine-tuning without distillation",
        ]
        setting = (
            f"{method}, {prune:g} + {mrft:g} epochs, density {factor:g} x keep ratio, pruned entries at weight {weight:g}, "
            + "".join(f"{extra}, " for extra in extras if extra) + f"lr {lr:g}"
        )
        for seed, lpaf, tfwsvd in sorted(seeds):
            rows.append([setting, seed, lpaf, tfwsvd, lpaf - tfwsvd])
        lpaf_scores, tfwsvd_scores = [s[1] for s in seeds], [s[2] for s in seeds]
        ahead = sum(lpaf >= tfwsvd for _, lpaf, tfwsvd in seeds)
        means.append([
            setting, len(seeds), statistics.mean(lpaf_scores), statistics.mean(tfwsvd_scores),
            statistics.mean(lpaf_scores) - statistics.mean(tfwsvd_scores), f"{ahead} of {len(seeds)}",
        ])
    means_table = table(["LPAF setting", "seeds", "LPAF", "TFWSVD + ft", "difference", "seeds with LPAF at or above"], means)
    body = (
        f"Task {args.task}, {args.train} training examples, keep ratio {args.ratio}: LPAF (prune + mixed-rank epochs) beside TFWSVD + ft for as many epochs (from the pretrained model: as many as LPAF less the dense model's fine-tuning), "
        "both at the same training seed and learning rate (the LPAF seed also drives pruning and the mixed-rank path draws). "
        "Dev scores after fine-tuning (every epoch chosen on the selection split), read from the lpaf_ablations.py runs' summaries.\n\n"
        + table(["LPAF setting", "seed", "LPAF", "TFWSVD + ft", "LPAF - TFWSVD + ft"], rows)
        + "\n\n### Mean over seeds\n\n"
        + means_table
    )
    pooled = [row for row in means if row[1] > 1] or means  # the headline: settings run on several seeds; the others in the detail
    headline = (
        f"Dev score after fine-tuning (epochs chosen on the selection split), mean over seeds; TFWSVD + ft trained for as many epochs at the same seed and learning rate "
        f"({args.task.upper()}, {args.train} training examples, keep ratio {args.ratio:g})."
        + (" Settings run on one seed only are in the detail.\n\n" if len(pooled) < len(means) else "\n\n")
        + table(["LPAF setting", "seeds", "LPAF", "TFWSVD + ft", "difference", "seeds with LPAF at or above"], pooled)
    )
    default_section = f"equal-steps-{args.task}{train_suffix(args.train)}-{args.ratio:g}"
    section = args.section or default_section
    command = (f"python benchmarks/equal_steps.py --task {args.task}" + (f" --train {args.train}" if args.train != DEFAULT_TRAIN else "")
               + f" --ratio {args.ratio:g}" + (f" --section {section}" if section != default_section else ""))
    write_section(
        section, f"LPAF vs TFWSVD + ft at equal steps over seeds, {args.task.upper()} at {args.ratio:g}{train_phrase(args.train)}"
        + ("" if section == default_section else ", " + section.removeprefix(default_section + "-").replace("-", " ")) + " (issue 4)",
        command, body, results=results_file("lpaf", args.task, train_suffix(args.train)), headline=headline,
    )


if __name__ == "__main__":
    main()
