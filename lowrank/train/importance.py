"""Importance of each weight entry: Fisher information (FWSVD, TFWSVD) and Taylor |g w| (TVD).

Fisher is the mean of *squared* gradients of the task loss, `E[(dL/dw)^2]`,
never the square of the mean gradient (which is near zero on a converged
model). One pass over the data yields both scores, since both need the same
gradients; only the targeted weights are kept, so BERT-base's 85M targeted
entries cost 340 MB per score.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from lowrank.devices import model_device, to_device
from lowrank.io.files import atomic_write_bytes, load_tensors, safetensors_bytes, safetensors_info
from lowrank.modules.layers import out_in
from lowrank.modules.surgery import linear_weights
from lowrank.train.loop import progress_bar

KINDS = ("fisher", "taylor")


@dataclass
class Importance:
    """Scores by layer name (per entry `(out, in)`; per input feature `(in,)` or `(in, in)` for the activation kinds),
    and how many examples they average over."""

    scores: dict[str, Tensor]
    num_samples: int
    kind: str = "fisher"


def _examples(batch: dict[str, Tensor]) -> Iterable[dict[str, Tensor]]:
    """Each example of a padded batch on its own, trimmed to its length."""
    lengths = batch["attention_mask"].sum(-1) if "attention_mask" in batch else None
    for i in range(batch["input_ids"].shape[0]):
        length = int(lengths[i]) if lengths is not None else batch["input_ids"].shape[1]
        yield {k: (v[i : i + 1, :length] if v.dim() == 2 else v[i : i + 1]) for k, v in batch.items()}


def collect_importance(
    model: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    names: Sequence[str],
    *,
    max_samples: int | None = None,
    per_example: bool = False,
    only_misclassified: bool = False,
    progress: bool = True,
    activations: bool = False,
) -> dict[str, Importance]:
    """Fisher and Taylor importance of the named Linear weights, in one pass over `loader`.

    Args:
        max_samples: stop after this many examples of the loader (None: all).
        per_example: square each example's gradient (the definition) instead of
            each mini-batch's (the cheap default; it underestimates the spread).
        only_misclassified: use only the examples the model gets wrong
            (TFWSVD's appendix: 1-2% of the data, nearly the same result).

        activations: also record each layer's input statistics in the same pass
            (`abs_mean` and `gram`, lowrank.train.activations), over the same examples.

    Returns:
        {"fisher": ..., "taylor": ...}, each an `Importance` averaged over the
        gradient units (examples or batches) that were used; with `activations`,
        also "abs_mean" (in,) and "gram" (in, in) per layer, averaged over tokens.
    """
    from lowrank.kinds import kind_of_model
    from lowrank.train.activations import ActivationRecorder

    weights = linear_weights(model, names, "importance target", conv1d=True)
    modules = dict(model.named_modules())  # scores are kept (out, in): a Conv1D's gradient is transposed
    # the loss is the model's own for its task (labels, or start and end positions); the kind says what "wrong" means
    kind = kind_of_model(model) if only_misclassified else None
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"fisher.max_samples: must be positive, got {max_samples}")
    was_training = model.training
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()  # no dropout: the importance of the model as it will be used
    for param in model.parameters():
        param.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    fisher = {n: torch.zeros_like(out_in(modules[n], w), dtype=torch.float32) for n, w in weights.items()}
    taylor = {n: torch.zeros_like(out_in(modules[n], w), dtype=torch.float32) for n, w in weights.items()}
    device = model_device(model)
    seen = used = units = 0
    bar = progress_bar(progress, total=max_samples, desc="importance", unit="ex")
    recorder = ActivationRecorder(model, names) if activations else None
    try:
        for batch in loader:
            if max_samples is not None and seen >= max_samples:
                break
            take = batch["input_ids"].shape[0] if max_samples is None else min(batch["input_ids"].shape[0], max_samples - seen)
            batch = to_device({k: v[:take] for k, v in batch.items()}, device)
            seen += take
            bar.update(take)
            if only_misclassified:
                keep = kind.misclassified(model, batch)
                if keep.numel() == 0:
                    continue
                batch = {k: v[keep] for k, v in batch.items()}
            parts = _examples(batch) if per_example else [batch]
            for part in parts:
                model.zero_grad(set_to_none=True)
                mask = part.get("attention_mask", torch.ones_like(part["input_ids"]))
                with recorder.counting(mask) if recorder else contextlib.nullcontext():
                    loss = model(**part).loss
                loss.backward()
                for name, weight in weights.items():
                    grad = out_in(modules[name], weight.grad).float()
                    fisher[name].addcmul_(grad, grad)
                    taylor[name].add_((grad * out_in(modules[name], weight.detach()).float()).abs())
                units += 1
            used += batch["input_ids"].shape[0]
    finally:
        bar.close()
        if recorder:
            recorder.remove()
        model.zero_grad(set_to_none=True)
        for param, flag in grad_flags.items():
            param.requires_grad_(flag)
        model.train(was_training)
    if units == 0:
        raise ValueError("no gradient was taken: the data is empty (or the model gets every example right)")
    for scores in (fisher, taylor):
        for tensor in scores.values():
            tensor.div_(units)
    found = {"fisher": Importance(fisher, used, "fisher"), "taylor": Importance(taylor, used, "taylor")}
    for kind, scores in (recorder.results() if recorder else {}).items():
        found[kind] = Importance(scores, used, kind)
    return found


def save_importance(importance: Importance, path: str | Path) -> Path:
    """One safetensors file, keys = layer names, with the sample count in its metadata."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in importance.scores.items()}
    return atomic_write_bytes(path, safetensors_bytes(tensors, {"num_samples": importance.num_samples, "kind": importance.kind}))


def load_importance(path: str | Path) -> Importance:
    """Read what `save_importance` wrote, naming the file if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"importance file not found: {path} (run the fisher stage)")
    metadata = safetensors_info(path)
    return Importance(load_tensors(path), int(metadata.get("num_samples", 0)), metadata.get("kind", "fisher"))
