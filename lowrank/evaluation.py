"""What the evaluate stage measures: predictions, parameter counts, size on disk, CPU latency."""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from lowrank.config import LATENCY_RUNTIMES
from lowrank.devices import model_device, to_device
from lowrank.modules.layers import FactorizedLinear

Condense = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # a task kind's


@torch.inference_mode()
def predict(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]], outputs: Sequence[str] = ("logits",),
            targets: Sequence[str] = ("labels",), condense: Condense | None = None) -> dict[str, torch.Tensor]:
    """The model's `outputs` and the batches' `targets` over a whole loader, by name, in the dataset's order
    (also when the loader sorts by length); with `condense` (a task kind's), what it keeps of each batch's outputs."""
    from lowrank.data.loading import gather, keep_parts

    model.eval()
    device = model_device(model)
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        batch = dict(batch)
        kept = {name: batch.pop(name) for name in targets}
        result = model(**to_device(batch, device))
        found = {name: getattr(result, name).float() for name in outputs}
        keep_parts(parts, kept, condense(found, kept) if condense else found)
    return gather(parts, loader)


def _weight_params(module: nn.Module) -> int:
    if isinstance(module, FactorizedLinear):
        return module.down.weight.numel() + module.up.weight.numel()
    return module.weight.numel()


def count_parameters(model: nn.Module, targets: Sequence[str]) -> dict[str, int]:
    """Parameter counts that compare with the papers.

    total: every parameter. encoder: the base model without its embeddings and
    pooler (what "compressed encoder" means in the papers). target_linear: the
    weights (not biases) of the targeted Linear layers, the quantity a keep
    ratio is a share of.
    """
    modules = dict(model.named_modules())
    missing = [name for name in targets if name not in modules]
    if missing:
        raise ValueError(f"targets not in the model: {missing[:3]}")
    base = getattr(model, "base_model", model)
    encoder = sum(p.numel() for n, p in base.named_parameters() if "embeddings" not in n and "pooler" not in n)
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "encoder": encoder,
        "target_linear": sum(_weight_params(modules[name]) for name in targets),
    }


def dir_size_bytes(path: str | Path) -> int:
    """Bytes of the weight files in a model folder (what a download costs), tokenizer excluded."""
    path = Path(path)
    files = [p for p in path.rglob("*.safetensors")] or [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def _vocab_size(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "vocab_size", 1000) or 1000)


def time_calls(call: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    """Median and p90 wall time (ms) of `repeats` calls after `warmup` untimed ones: one procedure for every runtime."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p90_ms": sorted(times)[min(len(times) - 1, int(0.9 * len(times)))] * 1e3,
    }


def _time_batches(
    prepare: Callable[[torch.Tensor], Callable[[], object]], vocab: int, batch_sizes: Sequence[int], seq_len: int, warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    """`time_calls` per batch size on seeded random tokens, the same for every runtime;
    `prepare` turns the token ids into the call to time, so its own setup stays untimed."""
    generator = torch.Generator().manual_seed(0)
    results: dict[str, dict[str, float]] = {}
    for batch_size in batch_sizes:
        input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        timing = time_calls(prepare(input_ids), warmup, repeats)
        results[f"batch_{batch_size}"] = {**timing, "samples_per_s": batch_size * 1e3 / timing["median_ms"]}
    return results


def _onnx_runner(model: nn.Module, int8: bool = False) -> tuple[Callable[[torch.Tensor], Callable[[], object]], float]:
    """The model's checked ONNX export in onnxruntime: (token ids -> the call to time, its largest logit difference)."""
    from lowrank.io.export import export_onnx, feed, onnx_session, parity, quantize_int8

    with tempfile.TemporaryDirectory(prefix="lowrank-onnx-") as folder:  # the session holds the graph in memory
        path = Path(folder) / "model.onnx"
        checked = export_onnx(model, path)
        if int8:
            quantize_int8(path, path.with_suffix(".int8.onnx"))
            path = path.with_suffix(".int8.onnx")
        session = onnx_session(path)  # as many threads as torch has now

    def prepare(input_ids: torch.Tensor) -> Callable[[], object]:
        inputs = feed(session, input_ids.numpy(), np.ones_like(input_ids.numpy()))
        return lambda: session.run(None, inputs)

    return prepare, parity(model, session) if int8 else checked["max_abs_diff"]


def _torch_runner(model: nn.Module) -> Callable[[torch.Tensor], Callable[[], object]]:
    model.eval()

    def prepare(input_ids: torch.Tensor) -> Callable[[], object]:
        attention_mask = torch.ones_like(input_ids)
        return lambda: model(input_ids=input_ids, attention_mask=attention_mask)

    return prepare


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median": statistics.median(ordered), "p10": at(0.1), "p90": at(0.9)}


@contextmanager
def _timing(runtime: str, threads: int | None):
    """A known runtime, and torch's thread count set for the measurement and restored after it."""
    if runtime not in LATENCY_RUNTIMES:
        raise ValueError(f"runtime: {runtime!r} is not one of {', '.join(LATENCY_RUNTIMES)}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def latency_side_by_side(
    models: dict[str, nn.Module],
    batch_sizes: Sequence[int] = (1, 32),
    seq_len: int = 64,
    warmup: int = 3,
    rounds: int = 10,
    threads: int | None = None,
    runtime: str = "torch",
) -> dict[str, Any]:
    """The models timed in turn on the same token ids, round after round, in one process (CPU).

    Load that comes and goes falls on all of them alike, so their ratios hold where figures taken in
    separate stages, minutes apart, do not. Each round starts at another model (no model always runs
    first). Returns `{"batch_<b>": {"ms": {label: {median, p10, p90}}, "speedup": {label: {median, p10, p90}}}}`,
    a speed-up being the first model's time over the label's within each round.
    """
    with _timing(runtime, threads):
        if runtime == "torch":
            runners = {label: _torch_runner(model) for label, model in models.items()}
        else:
            runners = {label: _onnx_runner(model, int8=runtime == "onnxruntime_int8")[0] for label, model in models.items()}
        labels, first = list(models), next(iter(models))
        generator = torch.Generator().manual_seed(0)
        results: dict[str, Any] = {}
        with torch.inference_mode():
            for batch_size in batch_sizes:
                input_ids = torch.randint(0, _vocab_size(models[first]), (batch_size, seq_len), generator=generator)
                calls = {label: runners[label](input_ids) for label in labels}
                for call in calls.values():
                    for _ in range(warmup):
                        call()
                times: dict[str, list[float]] = {label: [] for label in labels}
                for round_ in range(rounds):
                    for label in labels[round_ % len(labels):] + labels[:round_ % len(labels)]:
                        started = time.perf_counter()
                        calls[label]()
                        times[label].append((time.perf_counter() - started) * 1e3)
                results[f"batch_{batch_size}"] = {
                    "ms": {label: _quantiles(t) for label, t in times.items()},
                    "speedup": {label: _quantiles([a / b for a, b in zip(times[first], times[label])]) for label in labels[1:]},
                }
        return results


def measure_latency(
    model: nn.Module,
    batch_sizes: Sequence[int] = (1, 32),
    seq_len: int = 64,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
    runtime: str = "torch",
) -> dict[str, Any]:
    """Median forward time per batch size on random token ids of length `seq_len` (CPU).

    Returns `{"batch_<b>": {"median_ms", "p90_ms", "samples_per_s"}}`. The
    median of `repeats` timed runs after `warmup` untimed ones; threads are
    restored afterwards so a measurement does not change the process.
    `runtime="onnxruntime"` times the model's checked ONNX export instead, where
    a compressed model gains most on CPU (BENCHMARKS.md), and adds the export's
    largest logit difference from PyTorch (`onnx_max_abs_diff`);
    `"onnxruntime_int8"` the same graph with its MatMul weights quantized to int8.
    """
    with _timing(runtime, threads):
        if runtime.startswith("onnxruntime"):
            prepare, diff = _onnx_runner(model, int8=runtime == "onnxruntime_int8")
            return {**_time_batches(prepare, _vocab_size(model), batch_sizes, seq_len, warmup, repeats), "onnx_max_abs_diff": diff}
        with torch.inference_mode():
            return _time_batches(_torch_runner(model), _vocab_size(model), batch_sizes, seq_len, warmup, repeats)
