"""Benchmark (issue 24, part 3): dense and factorized models, fp32 and int8 (onnxruntime's dynamic quantization).

One `lowrank sweep` of benchmarks/specs/int8.yaml on SST-2 (2,000 training examples, params.yaml's method):
each evaluate stage times the fp32 ONNX graph and its int8 twin at batch 1 and 32 on 1 and 2 intra-op
threads, and scores both on the dev set. The dense model's evaluation is the reference (1.00x).

    .venv/bin/python benchmarks/int8.py
"""

from __future__ import annotations

import argparse

from lowrank.io.files import read_json
from lowrank.pipeline import get_stage
from product import configurations, run_sweep

from report import ROOT, table, write_section

SPEC = ROOT / "benchmarks" / "specs" / "int8.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    overrides = [f"data.task={args.task}", "orchestration.path=factorize_only", "evaluate.latency=true",
                 "evaluate.latency_runtimes=[onnxruntime,onnxruntime_int8]", f"evaluate.latency_repeats={args.repeats}"]
    run_sweep(SPEC, overrides, ["--workers", "1"])  # one job at a time: nothing else runs while a latency is timed
    configs = configurations(SPEC, overrides)

    rows, method = [], configs[0].params.factorize.method
    for threads in (1, 2):
        mine = [c for c in configs if c.params.evaluate.threads == threads]
        evaluations = [("dense", read_json(get_stage("evaluate_dense").metrics_path(mine[0].layout)))]
        evaluations += [(f"{method} {c.params.factorize.keep_ratio}", read_json(get_stage("evaluate_factorized").metrics_path(c.layout))) for c in mine]
        base = {b: evaluations[0][1]["latency_onnxruntime"][f"batch_{b}"]["median_ms"] for b in (1, 32)}
        for name, metrics in evaluations:
            for graph, key, score in (("fp32", "latency_onnxruntime", metrics["task"]["score"]),
                                      ("int8", "latency_onnxruntime_int8", metrics["task_onnxruntime_int8"]["score"])):
                ms = {b: metrics[key][f"batch_{b}"]["median_ms"] for b in (1, 32)}
                rows.append([threads, name, graph, ms[1], f"{base[1] / ms[1]:.2f}x", ms[32], f"{base[32] / ms[32]:.2f}x", score])
    machine = evaluations[0][1]["latency_machine"]
    body = (f"SST-2 models fine-tuned on 2,000 examples; {method} at each keep ratio, no + ft. Each graph is the evaluate "
            f"stage's checked ONNX export (fp32) and onnxruntime's `quantize_dynamic` of it (int8 weights); median of "
            f"{args.repeats} calls at sequence length 64 after 3 warm-up calls; speed-up against dense fp32 on the same threads. "
            f"Score: the dev set ({machine['cpu']}, onnxruntime {machine['onnxruntime']}).\n\n"
            + table(["threads", "model", "graph", "batch 1 ms", "speed-up", "batch 32 ms", "speed-up", "score"], rows))
    write_section("int8", "Low rank and int8 together (issue 24)", "python benchmarks/int8.py", body,
                  results="latency.md", headline=body)


if __name__ == "__main__":
    main()
