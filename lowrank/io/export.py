"""ONNX export of a (compressed) model of any task kind, with an output-parity check in onnxruntime.

A FactorizedLinear exports as two MatMuls, so any ONNX runtime runs the
compressed model without this library; the parity check proves the exported
graph computes what the PyTorch model computes before anyone ships it.

Attention exports through the model's eager implementation: torch's ONNX
rule for scaled_dot_product_attention guards fully masked rows with IsNaN and
Where over every score tensor, which cost MiniLM 4% of its onnxruntime time
at batch 32, and 8% once factorized at keep ratio 0.3 (BENCHMARKS.md); the
eager path's additive mask needs no guard.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowrank.io.files import atomic_write_bytes

INPUTS = ("input_ids", "attention_mask")


class _Outputs(nn.Module):
    """The outputs the model's task kind declares (logits; start and end logits), from positional inputs:
    the signature the exporter wants."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from lowrank.kinds import kind_of_model

        self.model = model
        self.names = tuple(kind_of_model(model).outputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        result = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        outputs = tuple(getattr(result, name) for name in self.names)
        return outputs[0] if len(outputs) == 1 else outputs


def takes_token_types(model: nn.Module) -> bool:
    """Whether the model tells sentence pairs apart by token type (BERT: type_vocab_size 2); its export then takes them."""
    return int(getattr(getattr(model, "config", None), "type_vocab_size", 0) or 0) > 1


def feed(session, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The inputs a session's graph takes, from a batch (token types zero when the batch has none)."""
    given = {"input_ids": input_ids, "attention_mask": attention_mask,
             "token_type_ids": np.zeros_like(input_ids) if token_type_ids is None else token_type_ids}
    return {i.name: given[i.name] for i in session.get_inputs()}


def predict_onnx(session, loader, outputs=("logits",), targets=("labels",), condense=None) -> dict[str, torch.Tensor]:
    """Outputs of an onnxruntime session and the batches' targets over a loader, in the dataset's order (as `evaluation.predict`)."""
    from lowrank.data.loading import gather, keep_parts

    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        kept = {name: batch[name] for name in targets}
        types = batch.get("token_type_ids")
        inputs = feed(session, batch["input_ids"].numpy(), batch["attention_mask"].numpy(), None if types is None else types.numpy())
        found = {name: torch.from_numpy(value).float() for name, value in zip(outputs, session.run(list(outputs), inputs))}
        keep_parts(parts, kept, condense(found, kept) if condense else found)
    return gather(parts, loader)


def quantize_int8(source: str | Path, path: str | Path) -> dict[str, float]:
    """onnxruntime's dynamic int8 quantization of an exported graph: every MatMul's constant weights (both thin
    products of a factorized layer) stored as int8, activations quantized on the fly. Returns the file's size."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with _quiet_quantizer():
            quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8)
        atomic_write_bytes(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return {"bytes": path.stat().st_size}


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The TorchScript exporter's warnings about what the parity check right after it proves: that the trace holds
    for other batch sizes and lengths (TracerWarning) and that indexing with negative indices would go wrong (the
    attention mask's indices are not negative); and the deprecation notices of the TorchScript exporter, which
    `dynamo=False` asks for, and of the functions it calls inside torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        yield


class _NoPreprocessingHint(logging.Filter):
    """onnxruntime's advice to run its shape pre-processing first: it changes nothing for dynamic quantization of MatMuls."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing before quantization")


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """`quantize_dynamic` logs its hint with `logging.warning` on the root logger, which, with no handler there yet,
    installs one for the whole process (every later library warning then prints as `WARNING:root:`); a NullHandler
    for the call keeps that from happening, the filter drops the hint."""
    root = logging.getLogger()
    hint, placeholder = _NoPreprocessingHint(), logging.NullHandler()
    added = not root.handlers
    if added:
        root.addHandler(placeholder)
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)
        if added:
            root.removeHandler(placeholder)


def parity(model: nn.Module, session, seq_len: int = 21) -> float:
    """The largest absolute difference of any output between a session and the PyTorch model on a fresh padded batch."""
    input_ids, attention_mask = _example(model, 3, seq_len, 1)
    wrapper = _Outputs(model.eval())
    with torch.no_grad():
        expected = wrapper(input_ids, attention_mask)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session.run(list(wrapper.names), feed(session, input_ids.numpy(), attention_mask.numpy()))
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """The model with transformers' eager attention for the duration, then as it was."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def _example(model: nn.Module, batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, seq_len // 2 :] = 0  # padding must export too
    return input_ids, attention_mask


def onnx_session(path: str | Path, threads: int | None = None, profile_prefix: str | None = None):
    """An onnxruntime CPU session on an exported model with every graph optimization
    (its fusions) on; `threads` intra-op threads, None for as many as torch uses.
    `profile_prefix` turns on onnxruntime's per-node profiler, its JSON written
    under that prefix when the session's `end_profiling()` is called."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


ONNX_PRODUCT_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")  # onnxruntime's products, after its fusions


def onnx_node_kind(event: dict) -> str | None:
    """Which part of the model a node of onnxruntime's profile belongs to: "linear"
    (a product by a weight), "attention" (QK^T, AV, softmax) or "other"; None for
    events that are not a node's kernel time.

    The export does not name nodes by module reliably after the optimizer's
    fusions, so products are told apart by their inputs: attention's take two
    per-head (batch, heads, length, dim) tensors, a Linear layer's a weight.
    """
    if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
        return None
    op = event["args"]["op_name"]
    per_head_inputs = sum(len(next(iter(s.values()))) == 4 for s in event["args"].get("input_type_shape", []))
    if op == "Softmax" or (op in ONNX_PRODUCT_OPS and per_head_inputs == 2):
        return "attention"
    return "linear" if op in ONNX_PRODUCT_OPS else "other"


def export_onnx(
    model: nn.Module, path: str | Path, *, seq_len: int = 16, opset: int = 18, atol: float = 1e-4, eager_attention: bool = True,
    token_types: bool = False,
) -> dict[str, float]:
    """Write `model` as ONNX (dynamic batch and length) and check it against PyTorch on fresh inputs.

    `eager_attention=False` exports the model's attention as it is set (for
    comparing the two graphs' speed). `token_types` adds the input
    `token_type_ids` (what a sentence-pair task needs); without it the graph
    takes token type 0 everywhere.

    Returns the largest absolute output difference; raises if it exceeds `atol`
    (the file is then not left behind).
    """
    import onnxruntime

    model = model.eval()
    wrapper = _Outputs(model).eval()  # the exporter sets the mode of the whole tree from the wrapper
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    names = [*INPUTS, "token_type_ids"] if token_types else list(INPUTS)
    from lowrank.kinds import kind_of_model

    outputs = kind_of_model(model).outputs
    dynamic = {name: {0: "batch", 1: "sequence"} for name in names} | {name: dict(axes) for name, axes in outputs.items()}
    example = _example(model, 2, seq_len, 0)
    example = (*example, torch.zeros_like(example[0])) if token_types else example
    with torch.no_grad(), (_eager_attention(model) if eager_attention else nullcontext()), _quiet_exporter():
        torch.onnx.export(
            wrapper, example, str(tmp), input_names=names, output_names=list(outputs),
            dynamic_axes=dynamic, opset_version=opset, dynamo=False,
        )
    try:
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        difference = parity(model, session, seq_len + 5)  # another batch and length than traced
        if not difference <= atol:
            raise AssertionError(f"ONNX export of {type(model).__name__} differs from PyTorch by {difference:.3g} > {atol}")
        atomic_write_bytes(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return {"max_abs_diff": difference, "bytes": path.stat().st_size}
