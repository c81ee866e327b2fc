"""Stages every path shares: prepare the data, fine-tune the dense teacher, evaluate a model folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lowrank.config import Params, TrainConfig
from lowrank.data import loading as data_lib
from lowrank.devices import place
from lowrank.io.files import atomic_dir, write_json
from lowrank.pipeline.prepared import PreparedData
from lowrank.pipeline.stage import StageIO, StageResult, stage
from lowrank.train.loop import TrainResult


@stage("prepare", params=("data", "model"), outputs={"data": "data"})
def prepare(p: Params, io: StageIO) -> StageResult:
    """Read the task's files, subsample, tokenize once, and save with the tokenizer."""
    from lowrank.io.models import load_tokenizer

    spec = data_lib.resolve_task(p.data)
    raw = data_lib.load_raw_from_config(p.data, spec)
    tokenizer = load_tokenizer(p.model)
    tokenized = data_lib.tokenize(raw, spec, tokenizer, p.data.max_length)
    with atomic_dir(io.outputs["data"]) as tmp:
        tokenized.save_to_disk(str(tmp / "dataset"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_json(tmp / "task.json", data_lib.task_to_dict(spec))
        write_json(tmp / "batching.json", {"group_by_length": p.data.group_by_length})
    metrics: dict[str, Any] = {split: {"rows": len(ds)} for split, ds in tokenized.items()}
    for split, ds in tokenized.items():
        lengths = [len(ids) for ids in ds["input_ids"]]
        metrics[split]["mean_tokens"] = sum(lengths) / max(len(lengths), 1)
        metrics[split]["max_tokens"] = max(lengths, default=0)
    return io.finish(metrics)


def train_metrics(result: TrainResult, score_key: str = "best_score") -> dict[str, Any]:
    """What every training stage reports about its run."""
    return {
        score_key: result.best_score,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "train_samples_per_s": result.train_samples_per_s,
        "history": result.history,
        "selected_on": data_lib.SELECT,  # the split of every score above; the evaluate stages report the task's own
    }


def train_and_save(
    model: torch.nn.Module,
    prepared: PreparedData,
    cfg: TrainConfig,
    io: StageIO,
    description: str,
    save: Callable[[torch.nn.Module, Path], None],
    extra_metrics: Callable[[TrainResult], dict[str, Any]] | None = None,
    **train_options: Any,
) -> StageResult:
    """Fine-tune `model` on the task, save it (with the tokenizer) as the stage's `model`, report the run.

    `train_options` go to `lowrank.train.loop.train` (teacher, distill, score_start).
    """
    from lowrank.train.loop import train

    loader = prepared.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    result = train(model, loader, cfg, evaluate=prepared.select_fn(cfg.eval_batch_size), description=description,
                   goal=prepared.kind.goal, **train_options)
    with atomic_dir(io.outputs["model"]) as tmp:
        save(model, tmp)
        prepared.tokenizer.save_pretrained(str(tmp))
    metrics = {**train_metrics(result), **(extra_metrics(result) if extra_metrics else {})}
    return io.finish(metrics, {"history": result.history})


def checkpoint_digest(p: Params) -> dict[str, str]:
    """With `model.finetuned`, the checkpoint's content hash: a changed checkpoint reruns everything after it."""
    from lowrank.io.files import digest
    from lowrank.io.models import resolve_model

    if not p.model.finetuned:
        return {}
    folder = Path(resolve_model(p.model.name))
    # a hub name has no local bytes to hash; the name itself (in the model section) is its identity then
    return {"checkpoint": digest(folder)} if folder.is_dir() else {}


@stage("finetune", params=("model", "train", "finetune"), inputs={"data": "prepare.data"}, outputs={"model": "finetune/model"},
       sources=checkpoint_digest, trains=True)
def finetune(p: Params, io: StageIO) -> StageResult:
    """Fine-tune the pretrained encoder on the task: the dense teacher. With `model.finetuned`, take the
    checkpoint as it is instead: evaluate it and hand it on."""
    from lowrank.io.models import load_for_task

    prepared = PreparedData.open(io.inputs["data"])
    torch.manual_seed(p.finetune.seed)
    model = place(load_for_task(p.model, prepared.spec))

    def save(m: torch.nn.Module, path: Path) -> None:
        m.save_pretrained(str(path), safe_serialization=True)

    if p.model.finetuned:
        result = take_as_is(model, prepared, p.finetune, io, save)
    else:
        result = train_and_save(model, prepared, p.finetune, io, "finetune", save)
    warn_if_trivial(result.metrics["best_score"], prepared.baseline_score(), prepared.kind.goal)
    return result


def warn_if_trivial(score: float, baseline: float | None, goal: str = "max") -> None:
    """Say so when the dense model is no better than the trivial answer: compressing it then measures nothing.
    A kind without one (a perplexity: `baseline` None) is never warned about."""
    from lowrank.kinds import better

    if baseline is not None and not better(score, baseline + (1e-9 if goal == "max" else -1e-9), goal):
        # written, not printed: inside a Prefect flow `print` becomes a (quiet) log record
        sys.stderr.write(f"warning: the dense model scores {score:.4f} on the selection split, no better than the trivial "
                         f"answer ({baseline:.4f}, such as always the most frequent label); more rows or epochs may help\n")


def take_as_is(model: torch.nn.Module, prepared: PreparedData, cfg: TrainConfig, io: StageIO,
               save: Callable[[torch.nn.Module, Path], None]) -> StageResult:
    """The already fine-tuned model, scored once on the selection split (as epoch 0 of a run without steps) and saved
    as the stage's model."""
    started = time.perf_counter()
    score = prepared.select_fn(cfg.eval_batch_size)(model)
    history = [{"epoch": 0.0, **score}]
    with atomic_dir(io.outputs["model"]) as tmp:
        save(model, tmp)
        prepared.tokenizer.save_pretrained(str(tmp))
    result = TrainResult(0, time.perf_counter() - started, 0.0, score["score"], 0, history)
    return io.finish({**train_metrics(result), "finetuned_before": True}, {"history": history})


def evaluate(p: Params, io: StageIO) -> StageResult:
    """Task score, parameter counts, size on disk and CPU latency of one model folder."""
    from lowrank.evaluation import count_parameters, dir_size_bytes, measure_latency
    from lowrank.io.checkpoints import load_compressed, recipe
    from lowrank.modules.matching import find_targets

    cfg, model_dir = p.evaluate, io.inputs["model"]
    prepared = PreparedData.open(io.inputs["data"])
    model = place(load_compressed(model_dir))
    started = time.perf_counter()
    scores = prepared.evaluate_fn(cfg.batch_size, report=True)(model)
    eval_seconds = time.perf_counter() - started
    model.cpu()  # latency is a CPU figure: the compressed models are meant to serve there
    targets = list(recipe(model).get("ranks", {})) or find_targets(model)
    metrics: dict[str, Any] = {
        "task": scores,
        "reported_on": list(prepared.spec.reported_splits),
        "eval_seconds": eval_seconds,
        "params": count_parameters(model, targets),
        "size_bytes": dir_size_bytes(model_dir),
    }
    timing = {
        "batch_sizes": tuple(cfg.latency_batch_sizes), "seq_len": cfg.latency_seq_len,
        "warmup": cfg.latency_warmup, "repeats": cfg.latency_repeats, "threads": cfg.threads,
    }
    for runtime in cfg.latency_runtimes if cfg.latency else ():
        metrics["latency" if runtime == "torch" else f"latency_{runtime}"] = measure_latency(model, runtime=runtime, **timing)
    if cfg.latency and "onnxruntime_int8" in cfg.latency_runtimes:
        metrics["task_onnxruntime_int8"] = int8_scores(model, prepared, cfg.batch_size)
    if cfg.latency:
        from lowrank.devices import runtime_versions

        metrics["latency_machine"] = runtime_versions()  # a latency holds on the CPU and the versions that measured it
    return io.finish(metrics)


def int8_scores(model: torch.nn.Module, prepared: PreparedData, batch_size: int) -> dict[str, float]:
    """The task scores of the model's ONNX export with int8 weights (what `onnxruntime_int8` times), on the eval splits."""
    import tempfile

    from lowrank.io.export import export_onnx, onnx_session, quantize_int8, takes_token_types

    with tempfile.TemporaryDirectory(prefix="lowrank-int8-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, path, token_types=prepared.spec.is_pair and takes_token_types(model))
        quantize_int8(path, path.with_suffix(".int8.onnx"))
        session = onnx_session(path.with_suffix(".int8.onnx"))
    return prepared.evaluate_fn(batch_size)(session)


EVALUATIONS: dict[str, str] = {}  # evaluate stage -> the model it scores ("<stage>.<output>"): what a run ships


def register_evaluation(name: str, model: str, ends_path: str | None = None) -> None:
    """An evaluate stage for the model folder `model` ("<stage>.<output>"); the last of `ends_path`, if given."""
    EVALUATIONS[name] = model
    stage(name, params=("evaluate",), inputs={"model": model, "data": "prepare.data"}, ends_path=ends_path)(evaluate)


register_evaluation("evaluate_dense", "finetune.model", ends_path="dense")  # the dense path: no summary, nothing to compare
