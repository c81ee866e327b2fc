"""Benchmark (issue 4): LPAF beside factorize-then-fine-tune, with its ablations, time and memory per stage.

The runs are one sweep, `benchmarks/specs/lpaf.yaml`, run by `lowrank sweep`
on params.yaml with this script's flags as overrides: LPAF (first-order
pruning -> sparse_tfwsvd -> mixed-rank fine-tuning) at each keep ratio, and
at the most compressed one the ablations, each changing one thing: magnitude
or movement pruning instead of taylor; plain SVD of the pruned matrices
instead of sparsity-aware; the pruning scores instead of the pruned model's
Fisher as the sparse weights; pruned entries at weight 0 instead of
`factorize.options.pruned_weight`; plain fine-tuning (p0 = 1) instead of mixed-rank;
mixed-rank fine-tuning without distillation. Another set of ratios or
ablations is another spec (`--spec`). The factorize-path rows come from
`benchmarks/quality.py`'s summary for the same task (run it first). Each
stage's seconds and the peak resident memory of its worker while it ran come
from the sweep; shared stages (the dense model, a pruned model that several
configurations factorize) run once.

    .venv/bin/python benchmarks/lpaf_ablations.py --task sst2
    .venv/bin/python benchmarks/lpaf_ablations.py --task sst2 --prune-distill --density-factor 2
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lowrank.io.files import read_json
from lowrank.pipeline import get_stage
from lowrank.pipeline.sweep_plan import plan, sweep_spec
from product import run_sweep, spec_path

from quality import DEFAULT_TRAIN, runs_folder, summary_file, train_phrase, train_suffix
from report import ROOT, results_file, table, write_section

SPEC = ROOT / "benchmarks" / "specs" / "lpaf.yaml"
# factorize.options.pruned_weight (before: factorize.pruned_weight) of every run before the flag existed (the default then): their sections and
# summaries carry no -pw suffix, so a run at this weight keeps their names and any other weight gets its own.
LEGACY_PRUNED_WEIGHT = 0.3
# prune.rank_pull_importance: how runs folders, sections and tables name the pull
PULL_PREFIXES = {"none": "", "scores": "w", "fisher": "f"}
PULL_LABELS = {"none": "plain", "scores": "score-weighted", "fisher": "Fisher-weighted"}
ABLATION_LABELS = {  # what an ablation of the spec changes -> its row's name
    "prune.method": "{} instead of {base} pruning",
    "factorize.method": "plain SVD of the pruned matrices",
    "factorize.options.importance": "pruning scores as the sparse weights instead of the Fisher",
    "factorize.options.pruned_weight": "pruned entries at weight {} (fit the kept entries only)",
    "mrft.p0": "plain fine-tuning instead of mixed-rank (p0 = {})",
    "mrft.distill.enabled": "mixed-rank fine-tuning with distillation {onoff}",
}


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The flags as params overrides, for every configuration of the sweep."""
    out = [f"data.task={args.task}", f"data.max_train_samples={args.train}", "evaluate.latency=false",
           f"prune.train.epochs={args.prune_epochs:g}", f"mrft.train.epochs={args.mrft_epochs:g}", f"prune.start_from={args.start_from}"]
    flags = {
        "prune.density_factor": args.density_factor, "factorize.options.pruned_weight": args.pruned_weight,  # an option of the sparse methods (the svd ablation resets them)
        "prune.rank_pull_pruned_weight": args.pruned_weight,  # the Fisher pull weighs pruned entries as the factorization will
        "prune.rank_pull": args.rank_pull, "prune.rank_pull_importance": args.rank_pull_importance, "mrft.train.lr": args.lr,
        "prune.train.seed": args.seed, "mrft.train.seed": args.seed, "mrft.seed": args.seed,
        "mrft.distill.enabled": None if args.mrft_distill is None else args.mrft_distill == "on",
        "prune.distill.enabled": True if args.prune_distill else None,
    }
    return out + [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None] + list(args.set_param)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="training subset; the quality benchmark must have run with the same --train")
    parser.add_argument("--prune-epochs", type=float, default=1.0)
    parser.add_argument("--mrft-epochs", type=float, default=1.0)
    parser.add_argument("--density-factor", type=float, default=None, help="prune to density = factor x keep ratio, capped at 1 (default: params.yaml's prune.density_factor)")
    parser.add_argument("--pruned-weight", type=float, default=None,
                        help="share of its importance a pruned entry keeps in the sparsity-aware factorization (default: the sparse methods' factorize.options.pruned_weight)")
    parser.add_argument("--prune-distill", action="store_true", help="distil the dense model's logits while pruning (prune.distill)")
    parser.add_argument("--start-from", default="finetuned", choices=["finetuned", "pretrained"],
                        help="prune the dense fine-tuned model further, or prune while fine-tuning the pretrained one (prune.start_from); "
                        "from pretrained, the + ft comparison at equal steps counts the dense model's fine-tuning epochs on the other side")
    parser.add_argument("--rank-pull", type=float, default=None,
                        help="while pruning, pull each matrix towards its rank-r part with this total strength (prune.rank_pull; default: params.yaml's)")
    parser.add_argument("--rank-pull-importance", default=None, choices=list(PULL_LABELS),
                        help="element weights of the pull's rank-r target (prune.rank_pull_importance; default: params.yaml's)")
    parser.add_argument("--seed", type=int, default=None, help="seed of pruning and mixed-rank fine-tuning, and of its path draws (default: params.yaml's)")
    parser.add_argument("--mrft-distill", default=None, choices=["on", "off"],
                        help="distil the dense model's logits in mixed-rank fine-tuning (mrft.distill.enabled; default: params.yaml's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of mixed-rank fine-tuning (default: params.yaml's mrft.train.lr)")
    parser.add_argument("--spec", type=spec_path, default=SPEC, help="the sweep: its grid is LPAF at each ratio, its configs the ablations")
    parser.add_argument("--workers", type=int, default=None, help="lowrank sweep --workers (default: the cores)")
    parser.add_argument("-S", "--set-param", action="append", default=[], help="a further override for every configuration")
    args = parser.parse_args()

    overrides = overrides_of(args)
    summary, _ = run_sweep(args.spec, overrides, ["--workers", str(args.workers)] if args.workers else [])
    spec = sweep_spec("params.yaml", args.spec, overrides)
    configs, _ = plan("params.yaml", spec, overrides, check=False)
    # The first LPAF run's params: params.yaml's own factorize.method (a factorize-path one) has no options of the sparse methods.
    base = configs[0].params
    sparse = base.factorize.method_options()
    prune_method = base.prune.method
    runs = runs_folder(args.task, args.train)
    start = "-pre" if args.start_from == "pretrained" else ""
    kd = "-kd" if args.prune_distill else ""
    seed = "" if args.seed is None else f"-seed{args.seed}"
    pull_importance = base.prune.rank_pull_importance
    pull = f"-{PULL_PREFIXES[pull_importance]}pull{base.prune.rank_pull:g}" if base.prune.rank_pull > 0 else ""
    density_factor = base.prune.density_factor
    mrft_train = base.mrft.train
    lr = "" if args.lr is None else f"-lr{mrft_train.lr:g}"
    out = runs / f"lpaf{start}-{args.prune_epochs:g}-{args.mrft_epochs:g}{kd}{pull}{seed}"  # equal_steps.py reads the summary here

    def prune_metrics(config) -> dict:
        return read_json(get_stage("prune").metrics_path(config.layout))

    results = list(zip(configs, summary["configs"]))
    in_grid = math.prod(len(values) for values in spec.grid.values()) if spec.grid else 0  # the grid's come first
    main_runs, ablation_runs = results[:in_grid], results[in_grid:]
    ratios = [c.params.factorize.keep_ratio for c, _ in main_runs]

    # quality.py's + ft rows with LPAF's seed and learning rate, and + ft for as many epochs as LPAF trains when it ran for it;
    # from the pretrained model, LPAF's pruning also does the dense model's fine-tuning, which the factorize path had before + ft
    reference_file = summary_file(runs, 1, mrft_train, base.finetune_compressed)
    quality = json.loads(reference_file.read_text()) if reference_file.is_file() else {"rows": []}
    reference = {(row[0], row[1]): (row[3], "not run" if row[4] is None else row[4]) for row in quality["rows"]}
    epochs = args.prune_epochs + args.mrft_epochs - (base.finetune.epochs if start else 0)
    if epochs <= 0:
        raise SystemExit(f"--start-from pretrained: --prune-epochs + --mrft-epochs must exceed the dense model's {base.finetune.epochs:g} fine-tuning epochs")
    same_budget_file = summary_file(runs, epochs, mrft_train, base.finetune_compressed)
    same_rows = json.loads(same_budget_file.read_text())["rows"] if same_budget_file.is_file() else []
    same_budget = {(r[0], r[1]): r[4] for r in same_rows}
    factorized_scores = {(r[0], r[1]): r[3] for r in quality["rows"] + same_rows}  # before + ft: the same in every run

    rows, pairs = [], []  # pairs: (ratio, LPAF, TFWSVD + ft at as many epochs or None), for equal_steps.py
    for config, result in main_runs:
        ratio = config.params.factorize.keep_ratio
        pairs.append((ratio, result["score"], same_budget.get(("tfwsvd", ratio))))
        label = f"LPAF ({prune_method}{' + distillation' if args.prune_distill else ''}, sparse_tfwsvd, mixed-rank)"
        rows.append([label, ratio, result["scores"]["evaluate_pruned_factorized"], result["score"]])
        for method in ("tfwsvd", "fwsvd", "svd"):
            if (method, ratio) in reference:
                rows.append([f"{method.upper()} + ft (quality benchmark)", ratio, *reference[(method, ratio)]])
            if same_budget.get((method, ratio)) is not None:
                budget = "as many as LPAF" if not start else f"as many as LPAF with the dense model's {base.finetune.epochs:g}"
                rows.append([f"{method.upper()} + ft for {epochs:g} epochs, {budget}", ratio, factorized_scores[(method, ratio)], same_budget[(method, ratio)]])
    for config, result in ablation_runs:
        changed = [k for k in config.overrides if k not in spec.grid or config.overrides[k] != main_runs[0][0].overrides.get(k)]
        key = next((k for k in changed if k in ABLATION_LABELS), changed[0])
        value = config.overrides[key]
        label = ABLATION_LABELS.get(key, f"{key} = {{}}").format(value, base=prune_method, onoff="on" if value else "off")
        rows.append([f"LPAF, {label}", config.params.factorize.keep_ratio, result["scores"]["evaluate_pruned_factorized"], result["score"]])

    ablation = min(ratios)
    ablation_config = next(c for c, _ in main_runs if c.params.factorize.keep_ratio == ablation)
    prune_info = prune_metrics(ablation_config)
    ranks = prune_info.get("rank_ratio", {})
    prune_scores = [[c.params.prune.density(c.params.factorize.keep_ratio), prune_metrics(c)["history"][-1]["score"]] for c, _ in main_runs]
    tail_phrase = (
        f"{prune_info['tail_share_dense']:.3f} in the dense model, {prune_info['tail_share']:.3f} after pruning (density {base.prune.density(ablation)}, mean over matrices)"
        if "tail_share" in prune_info else "not recorded"
    )
    costs: dict[str, dict[str, tuple[float, float]]] = {}  # stage -> job -> (seconds, peak MiB): a shared job counts once
    for config, result in results:
        for name, row in result["stages"].items():
            if not row["cached"] and row.get("seconds") is not None:
                costs.setdefault(name, {})[config.job(name)] = (row["seconds"], row.get("peak_rss_mib") or 0.0)
    cost_rows = [[key, len(v), sum(s for s, _ in v.values()) / len(v), max(m for _, m in v.values())] for key, v in costs.items()]
    rank_rows = [[label, *(values.get(k) for k in ("effective_rank_0.9_ratio", "effective_rank_0.99_ratio", "stable_rank_ratio"))] for label, values in ranks.items()]
    methods_table = table(["method", "keep ratio", "score before fine-tuning", "score after"], rows)
    pruned_line = f"Score of the {prune_method}-pruned model itself (before factorizing; its last epoch, on the selection split): " + ", ".join(f"density {r}: {score:.4f}" for r, score in prune_scores)
    body = (
        f"Task {args.task}, all-MiniLM-L6-v2, {args.train} training examples, the dense model of the quality benchmark. "
        f"LPAF: {prune_method} pruning for {args.prune_epochs:g} epoch(s) from the {args.start_from} model to density = {'keep ratio' if density_factor == 1 else f'{density_factor:g} x keep ratio'}"
        + (f" while pulling each matrix towards its {PULL_LABELS[pull_importance]} rank-r part (prune.rank_pull {base.prune.rank_pull:g}), " if pull else ", ")
        + f"share of the energy beyond the factor rank: {tail_phrase}; "
        f"sparsity-aware factorization ({sparse.importance} importance of the pruned model, pruned entries "
        f"at weight {sparse.pruned_weight:g}; distillation while pruning {'on' if args.prune_distill else 'off'}), then {args.mrft_epochs:g} epoch(s) of mixed-rank fine-tuning "
        f"(p0 {base.mrft.p0}, ramp {base.mrft.ramp_share}, distillation {'on' if base.mrft.distill.enabled else 'off'}). "
        f"The factorize-path rows had 1 epoch of + ft unless they say otherwise; LPAF trained for {args.prune_epochs + args.mrft_epochs:g}"
        + (f" from the pretrained model, the factorize path for {base.finetune.epochs:g} (the dense model) + the + ft epochs" if start else "") + ".\n\n"
        + methods_table
        + "\n\n" + pruned_line
        + f"\n\n### Effective rank of the pruned matrices at density {base.prune.density(ablation)} (mean over matrices, share of full rank)\n\n"
        + table(["model", "energy 90%", "energy 99%", "stable rank"], rank_rows)
        + "\n\n### Cost per stage (mean over the stage's jobs that ran in this sweep; peak memory of the worker process)\n\n"
        + table(["stage", "runs", "mean seconds", "peak RSS MiB"], cost_rows)
    )
    command = (
        f"python benchmarks/lpaf_ablations.py --task {args.task}" + (f" --train {args.train}" if args.train != DEFAULT_TRAIN else "")
        + f" --prune-epochs {args.prune_epochs:g} --mrft-epochs {args.mrft_epochs:g}" + (" --prune-distill" if args.prune_distill else "")
        + (" --start-from pretrained" if start else "")
        + f" --density-factor {density_factor:g}" + f" --pruned-weight {sparse.pruned_weight:g}"
        + (f" --rank-pull {base.prune.rank_pull:g} --rank-pull-importance {pull_importance}" if pull else "")
        + (f" --mrft-distill {args.mrft_distill}" if args.mrft_distill else "")
        + (f" --seed {args.seed}" if args.seed is not None else "") + (f" --lr {mrft_train.lr:g}" if args.lr is not None else "")
        + (f" --spec {args.spec.relative_to(ROOT)}" if args.spec != SPEC else "")
    )
    ratio_names = ",".join(f"{r:g}" for r in ratios)
    factor = "" if density_factor == 1 else f"-density{density_factor:g}x"
    weight = "" if sparse.pruned_weight == LEGACY_PRUNED_WEIGHT else f"-pw{sparse.pruned_weight:g}"
    name = f"lpaf{start}-{args.task}{train_suffix(args.train)}-{prune_method}-{ratio_names}-{args.prune_epochs:g}-{args.mrft_epochs:g}{kd}{factor}{weight}{pull}{seed}{lr}"
    title_extras = f", {PULL_LABELS[pull_importance]} rank pull {base.prune.rank_pull:g}" if pull else ""
    if args.mrft_distill is not None:
        name += f"-mrftkd-{args.mrft_distill}"
        title_extras += f", mixed-rank distillation {args.mrft_distill}"
    summary = {  # read by benchmarks/equal_steps.py, which pools seeds
        "task": args.task, "train": args.train, "prune_method": prune_method, "prune_epochs": args.prune_epochs, "mrft_epochs": args.mrft_epochs, "density_factor": density_factor,
        "pruned_weight": sparse.pruned_weight, "prune_distill": args.prune_distill, "start_from": args.start_from, "rank_pull": base.prune.rank_pull, "rank_pull_importance": pull_importance, "seed": base.prune.train.seed, "lr": mrft_train.lr, "mrft_distill": base.mrft.distill.enabled, "pairs": pairs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"summary-{name}.json").write_text(json.dumps(summary, indent=1))
    write_section(
        name, f"LPAF ({prune_method} pruning) on {args.task.upper()}{train_phrase(args.train)}, keep ratio {ratio_names}, {args.prune_epochs:g} + {args.mrft_epochs:g} epochs{', from the pretrained model' if start else ''}{title_extras} (issue 4)",
        command, body, results=results_file("lpaf", args.task, train_suffix(args.train)), headline=methods_table + "\n\n" + pruned_line,
    )


if __name__ == "__main__":
    main()
