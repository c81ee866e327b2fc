"""Benchmark (issue 3b, c, d): task scores of SVD, FWSVD, TFWSVD and TVD, with and without "+ ft".

The runs are one sweep, `benchmarks/specs/quality.yaml`, run by `lowrank sweep`
on params.yaml with the task, training subset and + ft budget as overrides:
every method at every keep ratio then + ft (b); plain SVD of one matrix type
at a time (c: does phi order the types by the drop SVD causes?); Fisher rank
allocation at equal parameters (d). Shared stages run once, every result is
kept in the store under the code version that made it, and an interrupted
benchmark resumes where the sweep stopped. This script writes the tables
from the sweep's summary and the factorize stages' metrics in the store.

    .venv/bin/python benchmarks/quality.py --task sst2 --train 2000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowrank.config import load_params
from lowrank.io.files import read_json
from lowrank.linalg.risk import rank_agreement
from lowrank.pipeline import get_stage
from product import PLAIN_FT, configurations, run_sweep, spec_path

from report import ROOT, results_file, table, write_section

SPEC = ROOT / "benchmarks" / "specs" / "quality.yaml"

TYPES = {
    "query": r".*\.attention\.self\.query",
    "key": r".*\.attention\.self\.key",
    "value": r".*\.attention\.self\.value",
    "attention_output": r".*\.attention\.output\.dense",
    "ffn_in": r".*\.intermediate\.dense",
    "ffn_out": r".*\.layer\.\d+\.output\.dense",
}


DEFAULT_TRAIN = 2000  # the training subset every benchmark folder and section assumes unless it names another


def train_suffix(train: int) -> str:
    """Names a training subset other than the default in folder and section names, so it reports beside the default's."""
    return "" if train == DEFAULT_TRAIN else f"-train{train}"


def train_phrase(train: int) -> str:
    """The same, for section titles."""
    return "" if train == DEFAULT_TRAIN else f", {train} training examples"


def runs_folder(task: str, train: int) -> Path:
    """Where a task's benchmark runs live: one folder per training subset, since the dense model differs."""
    return Path(f"benchmarks/runs/{task}{train_suffix(train)}")


def ft_suffix(ft, default) -> str:
    """Names a fine-tuning seed or learning rate other than params.yaml's (shared with lpaf_ablations.py, whose rows pair on it)."""
    return ("" if ft.seed == default.seed else f"-seed{ft.seed}") + ("" if ft.lr == default.lr else f"-lr{ft.lr:g}")


def ft_name(epochs: float, ft, default) -> str:
    """Names a + ft budget, seed and learning rate: its cached runs and its summary are apart from every other's."""
    return ("ft" if epochs == 1 else f"ft{epochs:g}") + ft_suffix(ft, default)


def summary_file(out: Path, epochs: float, ft, default) -> Path:
    """The summary quality.py leaves for that + ft setting; lpaf_ablations.py reads it to pair its rows."""
    name = ft_name(epochs, ft, default)
    return out / ("summary.json" if name == "ft" else f"summary-{name}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="training subset (dense, Fisher and + ft)")
    parser.add_argument("--ft-epochs", type=float, default=1.0)
    parser.add_argument("--ft-seed", type=int, default=None, help="seed of + ft (default: params.yaml's finetune_compressed.seed)")
    parser.add_argument("--ft-lr", type=float, default=None, help="learning rate of + ft (default: params.yaml's finetune_compressed.lr)")
    parser.add_argument("--spec", type=spec_path, default=SPEC, help="the sweep (its grid is table b, its configs tables c and d)")
    parser.add_argument("--workers", type=int, default=None, help="lowrank sweep --workers (default: the cores)")
    parser.add_argument("-S", "--set-param", action="append", default=[], help="a further override for every configuration")
    args = parser.parse_args()

    overrides = [f"data.task={args.task}", f"data.max_train_samples={args.train}", "evaluate.latency=false",
                 f"finetune_compressed.epochs={args.ft_epochs:g}", *PLAIN_FT, *args.set_param]
    overrides += [f"finetune_compressed.seed={args.ft_seed}"] if args.ft_seed is not None else []
    overrides += [f"finetune_compressed.lr={args.ft_lr}"] if args.ft_lr is not None else []
    summary, _ = run_sweep(args.spec, overrides, ["--workers", str(args.workers)] if args.workers else [])
    configs = configurations(args.spec, overrides)
    base = load_params("params.yaml", overrides)
    default_ft, ft = load_params("params.yaml").finetune_compressed, base.finetune_compressed
    ft_tag = ft_name(args.ft_epochs, ft, default_ft)

    rows, types, allocation_rows = [], {}, []
    dense_score = summary["configs"][0]["scores"]["evaluate_dense"]
    for config, result in zip(configs, summary["configs"]):
        cfg = config.params.factorize
        info = read_json(get_stage("factorize").metrics_path(config.layout))
        before = result["scores"]["evaluate_factorized"]
        if cfg.targets is not None:  # (c)
            types[next(k for k, pattern in TYPES.items() if cfg.targets == pattern)] = (before, info)
        elif cfg.allocation == "fisher":  # (d)
            ranks = [r["rank"] for r in info["layers"] if r["rank"] is not None]
            label = f"fisher, floor {cfg.min_rank_share:g} (ranks {min(ranks)}-{max(ranks)}, {len(info['layers']) - len(ranks)} dense)"
            allocation_rows.append([cfg.method, label, cfg.keep_ratio, info["keep_ratio_reached"], before])
        else:  # (b), whose scores before + ft are also (d)'s uniform rows; + ft where the configuration's path has it
            after = result["score"] if config.params.orchestration.path == "factorize" else None
            rows.append([cfg.method, cfg.keep_ratio, info["keep_ratio_reached"], before, after])
    for method in dict.fromkeys(r[0] for r in allocation_rows):
        allocation_rows += [[m, "uniform", ratio, reached, before] for m, ratio, reached, before, _ in rows if m == method]
    allocation_rows.sort(key=lambda r: (r[0], -r[2], r[1] != "uniform"))

    drops = {kind: dense_score - before for kind, (before, _) in types.items()}
    phis = {kind: sum(r["phi"] for r in info["layers"]) / len(info["layers"]) for kind, (_, info) in types.items()}
    scaled = {kind: sum(r["phi_size_invariant"] for r in info["layers"]) / len(info["layers"]) for kind, (_, info) in types.items()}
    # a spec without (c)'s one-type runs (e.g. benchmarks/specs/equal-steps-ft.yaml) has no order to compare
    agreement, agreement_scaled = (rank_agreement(phis, drops), rank_agreement(scaled, drops)) if len(types) > 1 else (None, None)
    type_ratio = configs[-1].params.factorize.keep_ratio if not types else next(
        c.params.factorize.keep_ratio for c in configs if c.params.factorize.targets is not None)

    methods_table = table(["method", "keep ratio", "reached", "score", "score + ft"], [[*r[:4], "not run" if r[4] is None else r[4]] for r in rows])
    prepared = read_json(get_stage("prepare").metrics_path(configs[0].layout))
    body = (
        f"Task {args.task}: all-MiniLM-L6-v2 fine-tuned on {prepared['train']['rows']} training examples "
        f"(params.yaml's finetune section), Fisher over the same examples, scored on the full dev set "
        f"({sum(v['rows'] for k, v in prepared.items() if k != 'train' and isinstance(v, dict) and 'rows' in v)} examples). Dense score: {dense_score:.4f}. "
        f"\"+ ft\": {args.ft_epochs:g} epoch(s) of fine-tuning after factorizing, same examples, "
        f"lr {ft.lr:g}. tfwsvd and tvd use the default solver (`factorize.solver: {base.factorize.solver}`, "
        f"{base.factorize.solver_steps} steps). All runs: one `lowrank sweep` of `{args.spec.relative_to(ROOT)}`.\n\n### Methods (b)\n\n"
        + methods_table
        + (f"\n\n### phi vs the drop of plain SVD, one matrix type at a time at keep ratio {type_ratio} (c)\n\n"
           + table(["type", "mean phi", "mean phi x N (size-invariant)", "score drop"], [[k, phis[k], scaled[k], drops[k]] for k in TYPES if k in types])
           + f"\n\nSpearman correlation with the drop: phi {agreement:.3f}, size-invariant phi {agreement_scaled:.3f} "
           "(1: phi orders the types exactly as plain SVD hurts them)." if agreement is not None else "")
        + ("\n\n### Uniform vs Fisher rank allocation at equal parameters, before fine-tuning (d)\n\n"
           + table(["method", "allocation", "keep ratio", "reached", "score"], allocation_rows) if allocation_rows else "")
    )
    out = runs_folder(args.task, args.train)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = summary_file(out, args.ft_epochs, ft, default_ft)  # lpaf_ablations.py pairs its rows with these
    summary_path.write_text(json.dumps({"rows": rows, "drops": drops, "phis": phis, "phis_scaled": scaled, "allocation": allocation_rows}, indent=1))
    suffix = "" if ft_tag == "ft" else f"-{ft_tag}"  # another fine-tuning budget reports beside the 1-epoch one, not over it
    budget = "" if ft_tag == "ft" else f", + ft for {args.ft_epochs:g} epochs, seed {ft.seed}, lr {ft.lr:g}"
    command = f"python benchmarks/quality.py --task {args.task} --train {args.train} --ft-epochs {args.ft_epochs:g}" + (
        f" --ft-seed {ft.seed}" if args.ft_seed is not None else "") + (f" --ft-lr {ft.lr:g}" if args.ft_lr is not None else "") + (
        f" --spec {args.spec.relative_to(ROOT)}" if args.spec != SPEC else "")
    write_section(
        f"quality-{args.task}{train_suffix(args.train)}{suffix}",
        f"Quality on {args.task.upper()}: methods, phi, allocation (issue 3b-d){train_phrase(args.train)}{budget}", command, body,
        results=results_file("quality", args.task, train_suffix(args.train)),
        headline=f"Dense score: {dense_score:.4f}. \"+ ft\": {args.ft_epochs:g} epoch(s) of fine-tuning after factorizing, lr {ft.lr:g}.\n\n" + methods_table,
    )


if __name__ == "__main__":
    main()
