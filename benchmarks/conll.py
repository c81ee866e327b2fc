"""CoNLL-2003 NER with all-MiniLM-L6-v2 (issue 33): the whole training set, dev selects, entity F1 on test.

One `lowrank sweep` per keep ratio (svd, fwsvd, tfwsvd, svd_llm), run one job at a time so each stage's seconds
are its own; the dense model and its Fisher are shared stages, run once. Each sweep's summary is kept under
benchmarks/runs/conll/ (the seconds of a stage are those of the run that computed it: a cached rerun reads 0).
The tables go to benchmarks/results/conll2003.md; BENCHMARKS.md's section is written by hand from them.

    .venv/bin/python benchmarks/conll.py --ratios 0.596,0.3,0.15

0.596 is the FWSVD paper's budget: 19% of MiniLM-L6's 22,568,841 parameters (with a 9-tag head) removed, all from
the 10,616,832 targeted Linear weights: 1 - 0.19 * 22568841 / 10616832 = 0.596.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from lowrank.io.files import read_json
from lowrank.pipeline import get_stage
from product import PLAIN_FT, configurations, run_sweep
from report import ROOT, table, write_section

RUNS = ROOT / "benchmarks" / "runs" / "conll"
METHODS = ("svd", "fwsvd", "tfwsvd", "svd_llm")
PAPER = {"dense": 88.5, ("svd", False): 12.5, ("svd", True): 88.0, ("fwsvd", False): 70.1, ("fwsvd", True): 88.6}


def dig(metrics: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        metrics = metrics[part]
    return metrics


def sweep(ratio: float, overrides: list[str]) -> list[dict[str, Any]]:
    """The four methods at `ratio`: per configuration, its stage metrics and the seconds of each stage."""
    RUNS.mkdir(parents=True, exist_ok=True)
    spec = RUNS / f"spec-{ratio}.json"
    spec.write_text(json.dumps({"configs": [{"factorize.method": m, "factorize.keep_ratio": ratio} for m in METHODS]}))
    summary, _ = run_sweep(spec, overrides, ["--workers", "1"])
    kept = RUNS / f"sweep-{ratio}.json"
    if any(not s["cached"] for c in summary["configs"] for s in c["stages"].values()) or not kept.exists():
        kept.write_text(json.dumps(summary, indent=1))  # the run that computed the stages: its seconds are theirs
    seconds = {i: {n: s["seconds"] for n, s in c["stages"].items()} for i, c in enumerate(json.loads(kept.read_text())["configs"])}
    rows = []
    for i, config in enumerate(configurations(spec, overrides)):
        stage = {n: read_json(get_stage(n).metrics_path(config.layout)) for n in ("evaluate_dense", "evaluate_factorized", "evaluate_compressed")}
        rows.append({"method": METHODS[i], "ratio": ratio, "metrics": stage, "seconds": seconds[i],
                     "ft": read_json(get_stage("finetune_compressed").metrics_path(config.layout))})
    return rows


def f1(metrics: dict[str, Any], split: str = "test") -> float:
    return 100 * metrics["task"]["test.f1" if split == "test" else "f1"]  # a flat key: the evaluation names test scores "test.<metric>"


def paper(row: dict[str, Any], ft: bool) -> str:
    published = PAPER.get((row["method"], ft)) if row["ratio"] == 0.596 else None
    return f"{published:.1f}" if published else ""


def ort_ms(metrics: dict[str, Any], batch: int) -> float:
    return dig(metrics, f"latency_onnxruntime.batch_{batch}.median_ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.596,0.3,0.15")
    parser.add_argument("--ft-epochs", type=float, default=1, help="+ ft epochs (the whole training set: 439 steps each)")
    args = parser.parse_args()
    os.environ.setdefault("CONLL_DIR", str(ROOT.parent / "shared" / "data" / "conll2003"))
    overrides = ["data.task=conll2003", "data.max_train_samples=null", f"finetune_compressed.epochs={args.ft_epochs:g}", *PLAIN_FT]
    rows = [row for ratio in (float(r) for r in args.ratios.split(",")) for row in sweep(ratio, overrides)]
    dense = rows[0]["metrics"]["evaluate_dense"]
    dense_f1, dense_ms = f1(dense), (ort_ms(dense, 1), ort_ms(dense, 32))
    quality = [["dense", "", f"{dense_f1:.2f}", "", f"{f1(dense, 'dev'):.2f}", "", PAPER["dense"], "", f"{dense['params']['total']:,}",
                "1.00x", "1.00x"]]
    for r in rows:
        before, after = r["metrics"]["evaluate_factorized"], r["metrics"]["evaluate_compressed"]
        quality.append([r["method"], r["ratio"], f"{f1(before):.2f}", f"{f1(after):.2f}", f"{f1(after, 'dev'):.2f}",
                        f"{f1(after) / dense_f1:.1%}", paper(r, False), paper(r, True), f"{after['params']['total']:,}",
                        f"{dense_ms[0] / ort_ms(after, 1):.2f}x", f"{dense_ms[1] / ort_ms(after, 32):.2f}x"])
    shared = ("prepare", "finetune", "evaluate_dense", "fisher")  # computed once, by the first configuration
    own = sorted({name for r in rows for name in r["seconds"]} - set(shared))
    seconds = [[r["method"], r["ratio"], *(f"{r['seconds'].get(name, 0):.0f}" for name in own)] for r in rows]
    body = (
        f"MiniLM-L6 fine-tuned on all 14,041 training sentences (3 epochs), best epoch on dev; + ft {args.ft_epochs:g} epoch "
        "on the whole set, best epoch on dev; entity F1 (seqeval) on test, dev beside it; latency in onnxruntime "
        "at sequence length 64, the dense model's time over the compressed one's. Published: FWSVD (ICLR 2022) Table 2.\n\n"
        + table(["method", "keep ratio", "test F1", "test F1 + ft", "dev F1 (+ ft)", "of dense", "paper", "paper + ft",
                 "parameters", "speed-up b1", "speed-up b32"], quality)
        + f"\n\nDense onnxruntime latency: {dense_ms[0]:.2f} ms at batch 1, {dense_ms[1]:.1f} ms at batch 32.\n\n"
        "Seconds per stage (the sweep that computed it; one job at a time); shared stages: "
        + ", ".join(f"{name} {rows[0]['seconds'][name]:.0f}" for name in shared) + "; per configuration:\n\n"
        + table(["method", "keep ratio", *own], seconds)
    )
    command = f"python benchmarks/conll.py --ratios {args.ratios} --ft-epochs {args.ft_epochs:g}"
    write_section("conll2003", "CoNLL-2003 NER, whole training set (issue 33)", command, body, results="conll2003.md")


if __name__ == "__main__":
    main()
