"""The fine-tuning loop, shared by dense, compressed, pruning and mixed-rank training.

One plain loop (AdamW, linear warm-up then decay, clipping, an evaluation per
epoch keeping the best weights); what differs between the methods plugs in
through `TrainHook`s and the optional teacher for distillation.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from lowrank.config import DistillationConfig, TrainConfig
from lowrank.devices import model_device, to_device
from lowrank.kinds import better, kind_of_model
from lowrank.train.hooks import TrainHook

EvaluateFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    """What a training run reports; `history` has one row per evaluation."""

    steps: int
    seconds: float
    train_samples_per_s: float
    best_score: float | None
    best_epoch: int | None
    history: list[dict[str, float]] = field(default_factory=list)


def progress_bar(progress: bool, **kwargs) -> tqdm:
    """A tqdm bar on stderr; `progress=False` hides it, and so does TQDM_DISABLE=1 (`lowrank --quiet`)."""
    hidden = not progress or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")
    return tqdm(disable=hidden, dynamic_ncols=True, file=sys.stderr, **kwargs)


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: `max_steps` if set, else epochs (may be fractional)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights, as BERT was trained."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL between softened distributions (MSE for regression), scaled by T^2 to keep gradients comparable.

    Without `mask`, the KL summed over all but the first axis, averaged over it (per example); with a (batch,
    length) `mask`, the KL of each marked position's distribution, averaged over those (per real token)."""
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    t = temperature
    if mask is None:
        return F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="none", log_target=True).sum(-1)
    real = mask.bool()
    return kl[real].sum() / real.sum().clamp(min=1) * t * t


def mean_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """The MSE of each block's tensor against the teacher's, averaged over the blocks."""
    return sum(F.mse_loss(s, t) for s, t in zip(student, teacher)) / len(student)


@dataclass(frozen=True)
class LossWeights:
    """One phase's mix: task + KD(logits) + MSE of the blocks' hidden states and attention probabilities."""

    task: float = 1.0
    logits: float = 0.0
    hidden: float = 0.0
    attention: float = 0.0
    temperature: float = 2.0

    @classmethod
    def predictions(cls, distill: DistillationConfig) -> "LossWeights":
        """Stage 2, or the only stage."""
        return cls(1 - distill.weight, distill.weight, distill.hidden_weight, distill.attention_weight, distill.temperature)

    @classmethod
    def intermediate(cls, distill: DistillationConfig) -> "LossWeights":
        """Stage 1: the blocks' outputs and attention maps, the task loss only if asked."""
        stage = distill.intermediate
        return cls(stage.task_weight, 0.0, stage.hidden_weight, stage.attention_weight, distill.temperature)


def weighted_loss(model: nn.Module, batch: dict[str, torch.Tensor], teacher: nn.Module | None, w: LossWeights) -> torch.Tensor:
    """The phase's loss of one batch; without a teacher, the task loss."""
    if teacher is None:
        return model(**batch).loss
    hidden, attention = w.hidden > 0, w.attention > 0
    outputs = model(**batch, output_hidden_states=hidden, output_attentions=attention)
    with torch.no_grad():
        reference = teacher(**batch, output_hidden_states=hidden, output_attentions=attention)
    # A term of weight 0 stays out of the graph: parameters only it reaches get no gradient, so no decay either
    # (stage 1 leaves the head alone).
    terms = []
    if w.task > 0:
        terms.append(w.task * outputs.loss)
    if w.logits > 0:
        kind = kind_of_model(model, default="sequence")  # a plain module is scored by its logits
        terms.append(w.logits * distillation_loss(kind.distill_logits(outputs), kind.distill_logits(reference), w.temperature,
                                                  kind.distill_mask(batch)))
    if hidden:  # hidden_states[0] is the embeddings' output, which compression does not touch
        terms.append(w.hidden * mean_mse(outputs.hidden_states[1:], reference.hidden_states[1:]))
    if attention:
        terms.append(w.attention * mean_mse(outputs.attentions, reference.attentions))
    return sum(terms[1:], terms[0])


@contextmanager
def attention_maps(models: Sequence[nn.Module | None], needed: bool):
    """Eager attention while attention maps are distilled (SDPA returns none), the models' own afterwards."""
    models = [m for m in models if m is not None and hasattr(m, "set_attn_implementation")]
    before = [m.config._attn_implementation for m in models]
    if needed:
        for m in models:
            m.set_attn_implementation("eager")
    try:
        yield
    finally:
        if needed:
            for m, implementation in zip(models, before):
                m.set_attn_implementation(implementation)


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own optimizer, schedule and loss (stage 1 and stage 2 of distillation)."""

    name: str
    cfg: TrainConfig
    weights: LossWeights


def phases(cfg: TrainConfig, distill: DistillationConfig | None) -> list[Phase]:
    """Stage 1 when distillation has one (its epochs, no `max_steps`), then the section's own run."""
    if distill is None:
        return [Phase("train", cfg, LossWeights())]
    last = Phase("predictions", cfg, LossWeights.predictions(distill))
    if distill.intermediate.epochs <= 0:
        return [last]
    first = replace(cfg, epochs=distill.intermediate.epochs, max_steps=None)
    return [Phase("intermediate", first, LossWeights.intermediate(distill)), last]


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def train(
    model: nn.Module,
    train_loader: DataLoader,
    cfg: TrainConfig,
    *,
    evaluate: EvaluateFn | None = None,
    hooks: Sequence[TrainHook] = (),
    teacher: nn.Module | None = None,
    distill: DistillationConfig | None = None,
    keep_best: bool | None = None,
    score_start: bool = False,
    goal: str = "max",
    progress: bool = True,
    description: str = "train",
    plan: Sequence[Phase] | None = None,
) -> TrainResult:
    """Fine-tune `model` in place; with `keep_best` (default: `cfg.keep_best`), end on the weights of the best evaluation.

    `evaluate(model)` must return a dict holding `score`, better as `goal` says (`max`; `min` for a perplexity).
    Pruning runs pass `keep_best=False`: an early epoch would have the wrong density.
    `score_start` scores the model before any step, as epoch 0: with `keep_best`, the run
    ends on the starting weights when no epoch beats them (a trained epoch wins ties).
    With `distill.intermediate.epochs`, stage 1 runs first with an optimizer and schedule of its own;
    epochs are numbered across both stages and `keep_best` chooses among all of them. `plan` replaces the
    phases that `cfg` and `distill` give (e.g. stage 1 alone, after each cut of a gradual compression).
    """
    keep_best = cfg.keep_best if keep_best is None else keep_best
    if distill is not None and not distill.enabled:
        distill = None
    if (teacher is None) != (distill is None):
        raise ValueError("distillation needs both a teacher model and an enabled DistillationConfig")
    torch.manual_seed(cfg.seed)
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise ValueError("the training set is empty")
    plan = list(plan) if plan else phases(cfg, distill)
    steps = [total_steps(phase.cfg, batches_per_epoch) for phase in plan]
    device = model_device(model)
    if teacher is not None:
        teacher.eval()
        if model_device(teacher) != device:
            raise ValueError(f"the teacher is on {model_device(teacher)}, the student on {device}")
    for hook in hooks:
        hook.on_train_begin(model, sum(steps))

    history: list[dict[str, float]] = []
    best: dict = {"score": None, "epoch": None, "state": None}

    def record(row: dict[str, float], write: Callable[..., None]) -> None:
        history.append(row)
        write(f"{description} epoch {int(row['epoch'])}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()), file=sys.stderr)
        # a trained epoch wins a tie with the start
        if keep_best and (better(row["score"], best["score"], goal) or (best["epoch"] == 0 and row["score"] == best["score"])):
            best.update(score=row["score"], epoch=int(row["epoch"]),
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})

    if score_start and evaluate is not None:
        # Scoring must not move the RNG that dropout and shuffling draw from (a DataLoader takes its
        # base seed from it): + ft trains exactly as it would without the epoch-0 score.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            record({"epoch": 0.0, "step": 0.0, **evaluate(model)}, tqdm.write)  # not print: a Prefect flow would swallow it
    samples, train_seconds, step, epoch = 0, 0.0, 0, 0
    bar = progress_bar(progress, total=sum(steps), desc=description)
    for index, (phase, phase_steps) in enumerate(zip(plan, steps)):
        optimizer = build_optimizer(model, phase.cfg)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(phase.cfg.warmup_ratio * phase_steps), phase_steps)
        phase_end = step + phase_steps
        with attention_maps([model, teacher], phase.weights.attention > 0 and teacher is not None):
            while step < phase_end:
                model.train()
                started = time.perf_counter()
                for batch in train_loader:
                    if step >= phase_end:
                        break
                    batch = to_device(batch, device)
                    for hook in hooks:
                        hook.before_forward(model, step)
                    loss = weighted_loss(model, batch, teacher, phase.weights)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{description}: loss became {loss.item()} at step {step}")
                    loss.backward()
                    for hook in hooks:
                        hook.after_backward(model, step)
                    if phase.cfg.max_grad_norm > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), phase.cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    for hook in hooks:
                        hook.after_step(model, step)
                    step += 1
                    samples += _batch_size(batch)
                    elapsed = train_seconds + time.perf_counter() - started
                    postfix = {"loss": f"{loss.item():.4f}", "samples/s": f"{samples / max(elapsed, 1e-9):.1f}"}
                    for hook in hooks:
                        postfix.update({k: f"{v:.3g}" for k, v in hook.metrics().items()})
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                train_seconds += time.perf_counter() - started
                epoch += 1
                if evaluate is not None and (phase.cfg.eval_every_epoch or step >= phase_end):
                    row = {"epoch": float(epoch), "step": float(step), **evaluate(model)}
                    if len(plan) > 1:
                        row["stage"] = float(index + 1)
                    record(row, bar.write)
    bar.close()
    for hook in hooks:
        hook.on_train_end(model)
    best_score, best_epoch = best["score"], best["epoch"]
    if keep_best and best["state"] is not None:
        model.load_state_dict(best["state"])
    elif history:
        best_score, best_epoch = history[-1]["score"], int(history[-1]["epoch"])
    return TrainResult(
        steps=step,
        seconds=train_seconds,
        train_samples_per_s=samples / max(train_seconds, 1e-9),
        best_score=best_score,
        best_epoch=best_epoch,
        history=history,
    )
