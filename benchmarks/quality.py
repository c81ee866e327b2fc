"""Benchmark (issue 3b, c, d): task scores of SVD, FWSVD, TFWSVD and TVD, with and without "+ ft".

For one task: prepare, fine-tune the dense MiniLM and collect its Fisher once;
then for every method and keep ratio: factorize, evaluate, fine-tune one
more time ("+ ft"), evaluate again. Also: plain SVD of one matrix type at a
time (does phi order the types by the drop SVD causes?) and uniform vs Fisher
rank allocation at equal parameters. Every run goes through the library's own
stage functions, with `params.yaml` as the base; results are cached per run
under `--out`, so an interrupted benchmark resumes.

    .venv/bin/python benchmarks/quality.py --task sst2 --train 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from datasets import load_from_disk

from lowrank.config import load_params
from lowrank.io.files import read_json
from lowrank.linalg.risk import rank_agreement
from product import call_stage, dense_runs

from report import add_threads_option, apply_threads, results_file, table, write_section

TYPES = {
    "query": r".*\.attention\.self\.query",
    "key": r".*\.attention\.self\.key",
    "value": r".*\.attention\.self\.value",
    "attention_output": r".*\.attention\.output\.dense",
    "ffn_in": r".*\.intermediate\.dense",
    "ffn_out": r".*\.layer\.\d+\.output\.dense",
}


def cached(path: Path, make) -> dict:
    """`make()` writes the metrics file `path`; skipped when it exists (resume)."""
    if not path.is_file():
        make()
    return read_json(path)


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
    """Names a fine-tuning seed or learning rate other than params.yaml's (shared with lpaf.py, whose rows pair on it)."""
    return ("" if ft.seed == default.seed else f"-seed{ft.seed}") + ("" if ft.lr == default.lr else f"-lr{ft.lr:g}")


def ft_name(epochs: float, ft, default) -> str:
    """Names a + ft budget, seed and learning rate: its cached runs and its summary are apart from every other's."""
    return ("ft" if epochs == 1 else f"ft{epochs:g}") + ft_suffix(ft, default)


def summary_file(out: Path, epochs: float, ft, default) -> Path:
    """The summary quality.py leaves for that + ft setting; lpaf.py reads it to pair its rows."""
    name = ft_name(epochs, ft, default)
    return out / ("summary.json" if name == "ft" else f"summary-{name}.json")


def merged_rows(new: list[list], earlier: list[list], width: int) -> list[list]:
    """The new rows, then the earlier summary's rows for what this run did not cover.

    The rows are keyed by their first `width` cells (method, ratio...), so a run over fewer
    methods or ratios updates its own rows and keeps the wider run's others for lpaf.py to pair with.
    """
    covered = {tuple(r[:width]) for r in new}
    return new + [r for r in earlier if tuple(r[:width]) not in covered]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="training subset (dense, Fisher and + ft); another size runs in its own folder")
    parser.add_argument("--methods", default="svd,fwsvd,tfwsvd,tvd")
    parser.add_argument("--ratios", default="0.5,0.3,0.15")
    parser.add_argument("--ft-epochs", type=float, default=1.0)
    parser.add_argument("--ft-seed", type=int, default=None, help="seed of + ft (default: params.yaml's finetune_compressed.seed)")
    parser.add_argument("--ft-lr", type=float, default=None, help="learning rate of + ft (default: params.yaml's finetune_compressed.lr)")
    parser.add_argument("--ft-ratios", default=None, help="keep ratios that also get + ft (default: all)")
    parser.add_argument("--ft-methods", default=None, help="methods that get + ft (default: all)")
    parser.add_argument("--allocation-methods", default="fwsvd,tfwsvd")
    parser.add_argument("--min-rank-shares", default="0,0.5", help="floors of the Fisher allocation (factorize.min_rank_share)")
    parser.add_argument("--type-ratio", type=float, default=0.15, help="keep ratio for the one-type-at-a-time runs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--seed-from", default=None, help="reuse data/finetune/fisher artifacts from this folder")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)

    out = Path(args.out) if args.out else runs_folder(args.task, args.train)
    base = load_params("params.yaml", [f"data.task={args.task}", f"data.max_train_samples={args.train}", "evaluate.latency=false"])
    if args.seed_from and not (out / "data").exists():
        for part in ("data", "finetune", "fisher"):
            shutil.copytree(Path(args.seed_from) / part, out / part)
    data, dense, fisher, metrics = dense_runs(out, base)

    def evaluate(model: Path, path: Path) -> dict:
        return call_stage("evaluate_dense", base, path, {"model": model, "data": data})

    dense_score = cached(metrics / "evaluate_dense.json", lambda: evaluate(dense, metrics / "evaluate_dense.json"))["task"]["score"]
    default_ft = base.finetune_compressed
    ft = dataclasses.replace(
        default_ft, epochs=args.ft_epochs, seed=default_ft.seed if args.ft_seed is None else args.ft_seed,
        lr=default_ft.lr if args.ft_lr is None else args.ft_lr,
    )
    # cached per budget, seed and learning rate: another setting never reuses these
    ft_tag = ft_name(args.ft_epochs, ft, default_ft)

    def compress(tag: str, finetune: bool, **factorize) -> tuple[float, float | None, dict]:
        cfg = dataclasses.replace(base.factorize, **factorize)
        model, tuned = out / tag / "model", out / tag / "ft" / "model"
        factorize_metrics = metrics / f"{tag}.factorize.json"
        if finetune and not (metrics / f"{tag}.{ft_tag}.json").is_file() and not (model / "config.json").is_file():
            factorize_metrics.unlink(missing_ok=True)  # an earlier run kept only metrics; + ft needs the model again
        info = cached(factorize_metrics, lambda: call_stage(
            "factorize", dataclasses.replace(base, factorize=cfg), factorize_metrics, {"model": dense, "importance": fisher}, {"model": model}))
        before = cached(metrics / f"{tag}.eval.json", lambda: evaluate(model, metrics / f"{tag}.eval.json"))
        after = None
        if finetune:
            cached(metrics / f"{tag}.{ft_tag}.json", lambda: call_stage(
                "finetune_compressed", dataclasses.replace(base, finetune_compressed=ft), metrics / f"{tag}.{ft_tag}.json",
                {"model": model, "data": data}, {"model": tuned}))
            after = cached(metrics / f"{tag}.{ft_tag}.eval.json", lambda: evaluate(tuned, metrics / f"{tag}.{ft_tag}.eval.json"))["task"]["score"]
            shutil.rmtree(out / tag / "ft", ignore_errors=True)  # keep only metrics: models are large
        shutil.rmtree(out / tag / "model", ignore_errors=True)
        return before["task"]["score"], after, info

    methods, ratios = args.methods.split(","), [float(r) for r in args.ratios.split(",")]
    ft_ratios = ratios if args.ft_ratios is None else [float(r) for r in args.ft_ratios.split(",") if r != "none"]
    ft_methods = methods if args.ft_methods is None else args.ft_methods.split(",")
    rows = []
    for ratio in ratios:
        for method in methods:
            before, after, info = compress(f"{method}-{ratio}", ratio in ft_ratios and method in ft_methods, method=method, keep_ratio=ratio)
            rows.append([method, ratio, info["keep_ratio_reached"], before, after])
            print(rows[-1], flush=True)

    # c. phi vs the drop plain SVD causes, one matrix type at a time
    drops, phis, scaled = {}, {}, {}
    for kind, pattern in TYPES.items():
        before, _, info = compress(f"type-{kind}-{args.type_ratio}", False, method="svd", keep_ratio=args.type_ratio, targets=pattern)
        drops[kind] = dense_score - before
        phis[kind] = sum(r["phi"] for r in info["layers"]) / len(info["layers"])
        scaled[kind] = sum(r["phi_size_invariant"] for r in info["layers"]) / len(info["layers"])
    agreement, agreement_scaled = rank_agreement(phis, drops), rank_agreement(scaled, drops)

    # d. uniform vs Fisher allocation at equal parameters (FWSVD and TFWSVD, before fine-tuning)
    allocation_rows = []
    for ratio in ratios:
        for method in args.allocation_methods.split(","):
            before, _, info = compress(f"{method}-{ratio}", False, method=method, keep_ratio=ratio)  # the (b) run
            allocation_rows.append([method, "uniform", ratio, info["keep_ratio_reached"], before])
            for share in (float(x) for x in args.min_rank_shares.split(",")):
                tag = f"{method}-fisher-{ratio}" if share == 0 else f"{method}-fisher{share:g}-{ratio}"
                before, _, info = compress(tag, False, method=method, keep_ratio=ratio, allocation="fisher", min_rank_share=share)
                ranks = [r["rank"] for r in info["layers"] if r["rank"] is not None]
                dense_layers = len(info["layers"]) - len(ranks)
                label = f"fisher, floor {share:g} (ranks {min(ranks)}-{max(ranks)}, {dense_layers} dense)"
                allocation_rows.append([method, label, ratio, info["keep_ratio_reached"], before])

    methods_table = table(["method", "keep ratio", "reached", "score", "score + ft"], [[*r[:4], "not run" if r[4] is None else r[4]] for r in rows])
    sizes = {split: {"rows": len(rows)} for split, rows in load_from_disk(str(data / "dataset")).items()}
    body = (
        f"Task {args.task}: all-MiniLM-L6-v2 fine-tuned on {sizes['train']['rows']} training examples "
        f"(params.yaml's finetune section), Fisher over the same examples, scored on the full dev set "
        f"({sum(v['rows'] for k, v in sizes.items() if k != 'train')} examples). Dense score: {dense_score:.4f}. "
        f"\"+ ft\": {args.ft_epochs:g} epoch(s) of fine-tuning after factorizing, same examples, "
        f"lr {ft.lr:g}. tfwsvd and tvd use the default solver (`factorize.solver: {base.factorize.solver}`, "
        f"{base.factorize.solver_steps} steps).\n\n### Methods (b)\n\n"
        + methods_table
        + f"\n\n### phi vs the drop of plain SVD, one matrix type at a time at keep ratio {args.type_ratio} (c)\n\n"
        + table(["type", "mean phi", "mean phi x N (size-invariant)", "score drop"], [[k, phis[k], scaled[k], drops[k]] for k in TYPES])
        + f"\n\nSpearman correlation with the drop: phi {agreement:.3f}, size-invariant phi {agreement_scaled:.3f} "
        "(1: phi orders the types exactly as plain SVD hurts them).\n\n"
        + "### Uniform vs Fisher rank allocation at equal parameters, before fine-tuning (d)\n\n"
        + table(["method", "allocation", "keep ratio", "reached", "score"], allocation_rows)
    )
    suffix = "" if ft_tag == "ft" else f"-{ft_tag}"  # another fine-tuning budget reports beside the 1-epoch one, not over it
    summary = summary_file(out, args.ft_epochs, ft, default_ft)
    earlier = json.loads(summary.read_text()) if summary.is_file() else {}
    rows_kept = merged_rows(rows, earlier.get("rows", []), 2)
    allocation_kept = merged_rows(allocation_rows, earlier.get("allocation", []), 3)
    summary.write_text(json.dumps({"rows": rows_kept, "drops": drops, "phis": phis, "phis_scaled": scaled, "allocation": allocation_kept}, indent=1))
    command = f"python benchmarks/quality.py --task {args.task} --train {args.train} --methods {args.methods} --ratios {args.ratios} --ft-epochs {args.ft_epochs:g}" + (
        f" --ft-ratios {args.ft_ratios}" if args.ft_ratios else ""
    ) + (f" --ft-methods {args.ft_methods}" if args.ft_methods else "") + (
        f" --ft-seed {ft.seed}" if args.ft_seed is not None else ""
    ) + (f" --ft-lr {ft.lr:g}" if args.ft_lr is not None else "") + f" --allocation-methods {args.allocation_methods} --min-rank-shares {args.min_rank_shares}"
    budget = "" if ft_tag == "ft" else f", + ft for {args.ft_epochs:g} epochs, seed {ft.seed}, lr {ft.lr:g}"
    # a run over fewer methods or ratios than the default reports beside the full run's section, not over it
    narrowed = (args.methods, args.ratios) != (parser.get_default("methods"), parser.get_default("ratios"))
    scope = f"-{args.methods}-{args.ratios}" if narrowed else ""
    scope_title = f", {args.methods.replace(',', ', ')} at keep ratio {args.ratios.replace(',', ', ')} only" if narrowed else ""
    write_section(
        f"quality-{args.task}{train_suffix(args.train)}{suffix}{scope}",
        f"Quality on {args.task.upper()}: methods, phi, allocation (issue 3b-d){train_phrase(args.train)}{budget}{scope_title}", command, body,
        results=results_file("quality", args.task, train_suffix(args.train)),
        headline=f"Dense score: {dense_score:.4f}. \"+ ft\": {args.ft_epochs:g} epoch(s) of fine-tuning after factorizing, lr {ft.lr:g}.\n\n" + methods_table,
    )


if __name__ == "__main__":
    main()
