"""Benchmark (issue 4): LPAF beside factorize-then-fine-tune, with its ablations, time and memory per stage.

Reuses the task's data, dense model and Fisher-method results of
`benchmarks/quality.py` (run it first for the same task), then for each keep
ratio runs LPAF (first-order pruning -> sparse_tfwsvd -> mixed-rank
fine-tuning), and at the most compressed ratio the ablations: magnitude
pruning, and the other first-order score, instead of the chosen one; plain
SVD of the pruned matrices instead of sparsity-aware; the pruning scores
instead of the pruned model's Fisher as the sparse weights; pruned entries at
weight 0 instead of `factorize.pruned_weight`; plain fine-tuning (p0 = 1)
instead of mixed-rank; mixed-rank fine-tuning with its distillation switched.
`--ablations` picks some of them; `--density-factor` prunes less than the
factors keep (density = factor x keep ratio), so the pruned model that
mixed-rank fine-tuning starts beside is stronger. Each stage's wall time and the
peak resident memory of the process while it ran are recorded. Results are
cached per run under `--runs`/lpaf-<budget>, so an interrupted benchmark resumes.

    .venv/bin/python benchmarks/lpaf.py --task sst2
    .venv/bin/python benchmarks/lpaf.py --task sst2 --ratios 0.15 --ablations none --prune-distill
    .venv/bin/python benchmarks/lpaf.py --task sst2 --ratios 0.15 --ablations none --density-factor 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import psutil

from lowrank.config import load_params
from lowrank.io.files import read_json
from product import call_stage

from quality import DEFAULT_TRAIN, runs_folder, summary_file, train_phrase, train_suffix
from report import add_threads_option, apply_threads, results_file, table, write_section

# factorize.pruned_weight of every run before the flag existed (the default then): their sections and
# summaries carry no -pw suffix, so a run at this weight keeps their names and any other weight gets its own.
LEGACY_PRUNED_WEIGHT = 0.3
# prune.rank_pull_importance: how runs folders, sections and tables name the pull
PULL_PREFIXES = {"none": "", "scores": "w", "fisher": "f"}
PULL_LABELS = {"none": "plain", "scores": "score-weighted", "fisher": "Fisher-weighted"}
ABLATIONS = ("magnitude", "other", "svd", "scores", "pw0", "p0", "kd")


class PeakMemory:
    """Peak resident set size of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> "PeakMemory":
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="training subset; the quality benchmark must have run with the same --train")
    parser.add_argument("--ratios", default="0.3,0.15")
    parser.add_argument("--prune-epochs", type=float, default=1.0)
    parser.add_argument("--mrft-epochs", type=float, default=1.0)
    parser.add_argument("--prune-method", default="taylor", choices=["taylor", "movement"])
    parser.add_argument("--ablations", default="all", help=f"comma list of {','.join(ABLATIONS)}, 'all' or 'none'")
    parser.add_argument("--density-factor", type=float, default=None, help="prune to density = factor x keep ratio, capped at 1 (default: params.yaml's prune.density_factor)")
    parser.add_argument("--pruned-weight", type=float, default=None,
                        help="share of its importance a pruned entry keeps in the sparsity-aware factorization (default: params.yaml's factorize.pruned_weight)")
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
                        help="distil the dense model's logits in mixed-rank fine-tuning (mrft.distill.enabled; default: params.yaml's); the kd ablation runs the other way")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of mixed-rank fine-tuning (default: params.yaml's mrft.train.lr)")
    parser.add_argument("--runs", default=None, help="the quality benchmark's folder (default benchmarks/runs/TASK, or TASK-trainN for another --train)")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    chosen = {"all": list(ABLATIONS), "none": []}.get(args.ablations, args.ablations.split(","))
    unknown = sorted(set(chosen) - set(ABLATIONS))
    if unknown:
        raise SystemExit(f"--ablations: unknown {unknown}; choose from {','.join(ABLATIONS)}")

    runs = Path(args.runs) if args.runs else runs_folder(args.task, args.train)
    kd = "-kd" if args.prune_distill else ""
    seed = "" if args.seed is None else f"-seed{args.seed}"
    data, dense = runs / "data", runs / "finetune" / "model"
    if not dense.exists():
        raise SystemExit(f"{dense} not found: run benchmarks/quality.py --task {args.task} first")
    overrides = [f"data.task={args.task}", f"data.max_train_samples={args.train}", "evaluate.latency=false", "orchestration.path=lpaf", "factorize.method=sparse_tfwsvd"]
    if args.density_factor is not None:
        overrides.append(f"prune.density_factor={args.density_factor}")
    if args.pruned_weight is not None:
        overrides.append(f"factorize.pruned_weight={args.pruned_weight}")
    if args.rank_pull is not None:
        overrides.append(f"prune.rank_pull={args.rank_pull}")
    if args.rank_pull_importance is not None:
        overrides.append(f"prune.rank_pull_importance={args.rank_pull_importance}")
    if args.mrft_distill is not None:
        overrides.append(f"mrft.distill.enabled={args.mrft_distill == 'on'}")
    base = load_params("params.yaml", overrides)  # a bad --density-factor, --pruned-weight or --rank-pull fails here, naming its key
    # the Fisher pull weighs pruned entries as the factorization will
    base = dataclasses.replace(base, prune=dataclasses.replace(base.prune, rank_pull_pruned_weight=base.factorize.pruned_weight))
    pull_importance = base.prune.rank_pull_importance
    pull = f"-{PULL_PREFIXES[pull_importance]}pull{base.prune.rank_pull:g}" if base.prune.rank_pull > 0 else ""
    start = "-pre" if args.start_from == "pretrained" else ""
    out = runs / f"lpaf{start}-{args.prune_epochs:g}-{args.mrft_epochs:g}{kd}{pull}{seed}"  # cached results are per training budget, pull and seed
    density_factor = base.prune.density_factor  # the flag's value, or params.yaml's when it is not given
    seeds = {} if args.seed is None else {"seed": args.seed}
    prune_train = dataclasses.replace(base.prune.train, epochs=args.prune_epochs, **seeds)
    prune_distill = dataclasses.replace(base.prune.distill, enabled=args.prune_distill)
    mrft_train = dataclasses.replace(base.mrft.train, epochs=args.mrft_epochs, lr=base.mrft.train.lr if args.lr is None else args.lr, **seeds)
    lr = "" if mrft_train.lr == base.mrft.train.lr else f"-lr{mrft_train.lr:g}"
    costs_file = out / "metrics" / "costs.json"  # kept across invocations, so a resumed run still reports every stage
    costs: dict[str, list] = read_json(costs_file) if costs_file.is_file() else {}

    def folder(path: Path) -> dict[str, Path]:
        """A pruned or factorized model's folder: the model and its masks, as prune and factorize_pruned write them."""
        return {"model": path / "model", "masks": path / "masks.safetensors"}

    def stage(key: str, tag: str, run) -> dict:
        path = out / "metrics" / f"{tag}.json"
        if not path.is_file():
            started = time.perf_counter()
            with PeakMemory() as memory:
                run(path)
            costs.setdefault(key, []).append((time.perf_counter() - started, memory.peak / 2**20))
            costs_file.write_text(json.dumps(costs))
        return read_json(path)

    def lpaf(
        ratio: float, prune_method: str = args.prune_method, method: str = "sparse_tfwsvd", p0: float | None = None,
        sparse_importance: str = base.factorize.sparse_importance, pruned_weight: float = base.factorize.pruned_weight,
        mrft_distill: bool = base.mrft.distill.enabled,
    ) -> dict:
        density = base.prune.density(ratio)
        prune_cfg = dataclasses.replace(base.prune, method=prune_method, train=prune_train, distill=prune_distill, start_from=args.start_from)
        factorize_cfg = dataclasses.replace(
            base.factorize, method=method, keep_ratio=ratio, sparse_importance=sparse_importance, pruned_weight=pruned_weight
        )
        mrft_cfg = dataclasses.replace(
            base.mrft, train=mrft_train, **seeds, p0=base.mrft.p0 if p0 is None else p0,
            distill=dataclasses.replace(base.mrft.distill, enabled=mrft_distill),
        )
        pruned = out / f"prune-{prune_method}-{density}"  # named by density: one pruned model serves every ratio that asks for it
        weights = "" if method == "svd" else f"-{sparse_importance}-pw{pruned_weight:g}"
        from_density = "" if density == ratio else f"-d{density}"
        factorized = out / f"factorize-{prune_method}-{method}{weights}-{ratio}{from_density}"
        tag = f"{prune_method}-{method}{weights}-{ratio}{from_density}-p0{mrft_cfg.p0}" + ("" if mrft_distill else "-kd0") + lr  # the cache names the state, whatever the default
        final = out / f"mrft-{tag}"
        prune = stage("prune", f"prune-{prune_method}-{density}", lambda m: call_stage(
            "prune", dataclasses.replace(base, prune=prune_cfg, factorize=factorize_cfg), m, {"model": dense, "data": data}, folder(pruned)))
        stage("factorize_pruned", factorized.name, lambda m: call_stage(
            "factorize_pruned", dataclasses.replace(base, factorize=factorize_cfg), m, {**folder(pruned), "data": data}, folder(factorized)))
        before = stage("evaluate", f"eval-{factorized.name}", lambda m: call_stage("evaluate_dense", base, m, {"model": factorized / "model", "data": data}))
        stage("mrft", f"mrft-{tag}", lambda m: call_stage(
            "mrft", dataclasses.replace(base, mrft=mrft_cfg), m,
            {"pruned": pruned / "model", "factorized": factorized / "model", "masks": factorized / "masks.safetensors", "teacher": dense, "data": data},
            {"model": final}))
        after = stage("evaluate", f"eval-mrft-{tag}", lambda m: call_stage("evaluate_dense", base, m, {"model": final, "data": data}))
        shutil.rmtree(final, ignore_errors=True)
        return {"prune": prune, "before": before["task"]["score"], "after": after["task"]["score"], "params": after["params"]}

    # quality.py's + ft runs with LPAF's seed and learning rate (--ft-seed, --ft-lr)
    # (method, ratio) -> scores before and after 1 epoch of + ft, when quality.py ran with that budget
    reference_file = summary_file(runs, 1, mrft_train, base.finetune_compressed)
    quality = json.loads(reference_file.read_text()) if reference_file.is_file() else {"rows": []}
    reference = {(row[0], row[1]): (row[3], "not run" if row[4] is None else row[4]) for row in quality["rows"]}
    # + ft with as many epochs as LPAF trains, when quality.py was run for it; from the pretrained model,
    # LPAF's pruning also does the dense model's fine-tuning, which the factorize path had before + ft
    epochs = args.prune_epochs + args.mrft_epochs - (base.finetune.epochs if args.start_from == "pretrained" else 0)
    if epochs <= 0:
        raise SystemExit(f"--start-from pretrained: --prune-epochs + --mrft-epochs must exceed the dense model's {base.finetune.epochs:g} fine-tuning epochs")
    same_budget_file = summary_file(runs, epochs, mrft_train, base.finetune_compressed)
    same_rows = json.loads(same_budget_file.read_text())["rows"] if same_budget_file.is_file() else []
    same_budget = {(r[0], r[1]): r[4] for r in same_rows}
    factorized_scores = {(r[0], r[1]): r[3] for r in quality["rows"] + same_rows}  # before + ft: the same in every run
    ratios = [float(r) for r in args.ratios.split(",")]
    rows, pairs = [], []  # pairs: (ratio, LPAF, TFWSVD + ft at as many epochs or None), for equal_steps.py
    for ratio in ratios:
        result = lpaf(ratio)
        pairs.append((ratio, result["after"], same_budget.get(("tfwsvd", ratio))))
        rows.append([f"LPAF ({args.prune_method}{' + distillation' if args.prune_distill else ''}, sparse_tfwsvd, mixed-rank)", ratio, result["before"], result["after"]])
        for method in ("tfwsvd", "fwsvd", "svd"):
            if (method, ratio) in reference:
                rows.append([f"{method.upper()} + ft (quality benchmark)", ratio, *reference[(method, ratio)]])
            if same_budget.get((method, ratio)) is not None:
                budget = "as many as LPAF" if not start else f"as many as LPAF with the dense model's {base.finetune.epochs:g}"
                rows.append([f"{method.upper()} + ft for {epochs:g} epochs, {budget}", ratio, factorized_scores[(method, ratio)], same_budget[(method, ratio)]])
    ablation = min(ratios)
    other = "movement" if args.prune_method == "taylor" else "taylor"
    settings = {
        "magnitude": (f"magnitude instead of {args.prune_method} pruning", {"prune_method": "magnitude"}),
        "other": (f"{other} instead of {args.prune_method} pruning", {"prune_method": other}),
        "svd": ("plain SVD of the pruned matrices", {"method": "svd"}),
        "scores": ("pruning scores as the sparse weights instead of the Fisher", {"sparse_importance": "scores"}),
        "pw0": ("pruned entries at weight 0 (fit the kept entries only)", {"pruned_weight": 0.0}),
        "p0": ("plain fine-tuning instead of mixed-rank (p0 = 1)", {"p0": 1.0}),
        "kd": (f"mixed-rank fine-tuning with distillation {'off' if base.mrft.distill.enabled else 'on'}", {"mrft_distill": not base.mrft.distill.enabled}),
    }
    for key in chosen:
        label, kwargs = settings[key]
        result = lpaf(ablation, **kwargs)
        rows.append([f"LPAF, {label}", ablation, result["before"], result["after"]])

    prune_metrics = read_json(out / "metrics" / f"prune-{args.prune_method}-{base.prune.density(ablation)}.json")
    ranks = prune_metrics.get("rank_ratio", {})
    densities = [base.prune.density(r) for r in ratios]
    prune_scores = [[d, read_json(out / "metrics" / f"prune-{args.prune_method}-{d}.json")["history"][-1]["score"]] for d in densities]
    tail_phrase = (
        f"{prune_metrics['tail_share_dense']:.3f} in the dense model, {prune_metrics['tail_share']:.3f} after pruning (density {base.prune.density(ablation)}, mean over matrices)"
        if "tail_share" in prune_metrics else "not recorded (a prune run from before the metric)"
    )
    rank_rows = [[label, *(values.get(k) for k in ("effective_rank_0.9_ratio", "effective_rank_0.99_ratio", "stable_rank_ratio"))] for label, values in ranks.items()]
    cost_rows = [[key, len(v), sum(s for s, _ in v) / len(v), max(m for _, m in v)] for key, v in costs.items()]
    methods_table = table(["method", "keep ratio", "score before fine-tuning", "score after"], rows)
    pruned_line = f"Score of the {args.prune_method}-pruned model itself (before factorizing): " + ", ".join(f"density {r}: {score:.4f}" for r, score in prune_scores)
    body = (
        f"Task {args.task}, all-MiniLM-L6-v2, {args.train} training examples, the dense model of the quality benchmark. "
        f"LPAF: {args.prune_method} pruning for {args.prune_epochs:g} epoch(s) from the {args.start_from} model to density = {'keep ratio' if density_factor == 1 else f'{density_factor:g} x keep ratio'}"
        + (f" while pulling each matrix towards its {PULL_LABELS[pull_importance]} rank-r part (prune.rank_pull {base.prune.rank_pull:g}), " if pull else ", ")
        + f"share of the energy beyond the factor rank: {tail_phrase}; "
        f"sparsity-aware factorization ({base.factorize.sparse_importance} importance of the pruned model, pruned entries "
        f"at weight {base.factorize.pruned_weight:g}; distillation while pruning {'on' if args.prune_distill else 'off'}), then {args.mrft_epochs:g} epoch(s) of mixed-rank fine-tuning "
        f"(p0 {base.mrft.p0}, ramp {base.mrft.ramp_share}, distillation {'on' if base.mrft.distill.enabled else 'off'}). "
        f"The factorize-path rows had 1 epoch of + ft unless they say otherwise; LPAF trained for {args.prune_epochs + args.mrft_epochs:g}"
        + (f" from the pretrained model, the factorize path for {base.finetune.epochs:g} (the dense model) + the + ft epochs" if start else "") + ".\n\n"
        + methods_table
        + "\n\n" + pruned_line
        + f"\n\n### Effective rank of the pruned matrices at density {base.prune.density(ablation)} (mean over matrices, share of full rank)\n\n"
        + table(["model", "energy 90%", "energy 99%", "stable rank"], rank_rows)
        + "\n\n### Cost per stage (mean over the runs of each stage, all invocations of this setting)\n\n"
        + table(["stage", "runs", "mean seconds", "peak RSS MiB"], cost_rows)
    )
    command = (
        f"python benchmarks/lpaf.py --task {args.task}" + (f" --train {args.train}" if args.train != DEFAULT_TRAIN else "") + f" --ratios {args.ratios} --prune-epochs {args.prune_epochs:g} "
        f"--mrft-epochs {args.mrft_epochs:g} --prune-method {args.prune_method}" + f" --ablations {args.ablations}" + (" --prune-distill" if args.prune_distill else "")
        + (" --start-from pretrained" if start else "")
        + f" --density-factor {density_factor:g}" + f" --pruned-weight {base.factorize.pruned_weight:g}"
        + (f" --rank-pull {base.prune.rank_pull:g} --rank-pull-importance {pull_importance}" if pull else "")
        + (f" --mrft-distill {args.mrft_distill}" if args.mrft_distill else "")
        + (f" --seed {args.seed}" if args.seed is not None else "") + (f" --lr {mrft_train.lr:g}" if args.lr is not None else "")
    )
    factor = "" if density_factor == 1 else f"-density{density_factor:g}x"
    weight = "" if base.factorize.pruned_weight == LEGACY_PRUNED_WEIGHT else f"-pw{base.factorize.pruned_weight:g}"
    name = f"lpaf{start}-{args.task}{train_suffix(args.train)}-{args.prune_method}-{args.ratios}-{args.prune_epochs:g}-{args.mrft_epochs:g}{kd}{factor}{weight}{pull}{seed}{lr}"
    title_extras = f", {PULL_LABELS[pull_importance]} rank pull {base.prune.rank_pull:g}" if pull else ""
    if args.mrft_distill is not None:
        name += f"-mrftkd-{args.mrft_distill}"
        title_extras += f", mixed-rank distillation {args.mrft_distill}"
    summary = {  # read by benchmarks/equal_steps.py, which pools seeds
        "task": args.task, "train": args.train, "prune_method": args.prune_method, "prune_epochs": args.prune_epochs, "mrft_epochs": args.mrft_epochs, "density_factor": density_factor,
        "pruned_weight": base.factorize.pruned_weight, "prune_distill": args.prune_distill, "start_from": args.start_from, "rank_pull": base.prune.rank_pull, "rank_pull_importance": pull_importance, "seed": prune_train.seed, "lr": mrft_train.lr, "mrft_distill": base.mrft.distill.enabled, "pairs": pairs,
    }
    (out / f"summary-{name}.json").write_text(json.dumps(summary, indent=1))
    write_section(
        name, f"LPAF ({args.prune_method} pruning) on {args.task.upper()}{train_phrase(args.train)}, keep ratio {args.ratios}, {args.prune_epochs:g} + {args.mrft_epochs:g} epochs{', from the pretrained model' if start else ''}{title_extras} (issue 4)",
        command, body, results=results_file("lpaf", args.task, train_suffix(args.train)), headline=methods_table + "\n\n" + pruned_line,
    )


if __name__ == "__main__":
    main()
