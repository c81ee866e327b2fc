"""Benchmark (issue 37): a fused projection factorized as one matrix or split per group, at equal parameters.

ModernBERT's `attn.Wqkv` and GPT-2's `attn.c_attn` hold Q, K and V stacked, `(3 d, in)`. lowrank factorizes
such a layer as one matrix: Q, K and V read the same input, so one `B (rank, in)` serves all three, and a
rank-r factorization costs `r (3 d + in)` against `3 r' (d + in)` for three separate ones. This script
measures both at the same parameter count, with SVD and SVD-LLM, on the output of the model with only those layers
replaced: the tiny random ModernBERT and GPT-2 of the tests (hidden 32), and, for weights that learnt
something, all-MiniLM-L6-v2 with each block's query, key and value stacked as if fused, on SST-2 dev sentences.

    .venv/bin/python benchmarks/fused_projections.py
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from lowrank.io.models import resolve_model
from lowrank.config import DEFAULT_MODEL
from lowrank.linalg.ranks import uniform_ranks
from lowrank.api import factorizer
from lowrank.config import FactorizeConfig
from lowrank.modules.layers import linear_weight, out_in
from lowrank.train.activations import ActivationRecorder

from report import table, write_section

GROUPS = 3  # Q, K, V
TINY = {  # the tests' tiny configs (tests/test_families.py), with the fused layers' suffix
    "modernbert": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                        sep_token_id=2), "attn.Wqkv"),
    "gpt2": (dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=100, n_positions=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2), "attn.c_attn"),
}


def reconstruct(weight: Tensor, keep_ratio: float, split: bool, method: str, gram: Tensor) -> tuple[Tensor, int]:
    """`weight (3 d, in)` at rank(s) that keep `keep_ratio` of its parameters, by `method` on the whole matrix or on
    each group (SVD-LLM whitens every group by the same input's Gram matrix); and the rank."""
    parts = weight.chunk(GROUPS) if split else (weight,)
    shapes = {str(i): tuple(part.shape) for i, part in enumerate(parts)}
    rank = uniform_ranks(shapes, keep_ratio)["0"]
    factorize = factorizer(FactorizeConfig(method=method))
    factors = [factorize(part, rank, importance=gram) for part in parts]
    return torch.cat([a @ b for a, b in factors]), rank  # (3 d, in)


# For a model: per fused projection, the name of the Linear whose input it reads, and how to read and write its weight.
Accessors = Callable[[nn.Module], list[tuple[str, Callable[[], Tensor], Callable[[Tensor], None]]]]


def input_grams(model: nn.Module, fused: Accessors, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The Gram matrix of each fused projection's input over the real tokens (what SVD-LLM whitens by)."""
    recorder = ActivationRecorder(model, [name for name, _, _ in fused(model)])
    with torch.no_grad(), recorder.counting(inputs["attention_mask"]):
        model(**inputs)
    recorder.remove()
    return recorder.results()["gram"]


def output_error(model: nn.Module, fused: Accessors, inputs: dict[str, Tensor], keep_ratio: float, split: bool,
                 method: str, grams: dict[str, Tensor]) -> tuple[float, float, int]:
    """Mean relative error of the fused weights, relative error of the last hidden states (over real tokens) with
    those weights replaced by their factorization, and the rank used."""
    with torch.no_grad():
        dense = model(**inputs).last_hidden_state
        changed, weight_errors, rank = copy.deepcopy(model), [], 0
        for name, read, write in fused(changed):
            weight = read()
            approx, rank = reconstruct(weight, keep_ratio, split, method, grams[name])
            weight_errors.append(float((weight - approx).norm() / weight.norm()))
            write(approx)
        got = changed(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()
    return sum(weight_errors) / len(weight_errors), float((got - dense)[real].norm() / dense[real].norm()), rank


def fused_layers(suffix: str) -> Accessors:
    """Read/write pairs of the `(3 d, in)` weight of every layer named `*.suffix` (a Conv1D's transposed both ways)."""

    def bind(model: nn.Module):
        modules = [(name, m) for name, m in model.named_modules() if name.endswith(suffix)]
        return [(name, (lambda m=m: linear_weight(m).clone()), (lambda w, m=m: m.weight.copy_(out_in(m, w))))
                for name, m in modules]

    return bind


def stacked_qkv(model: nn.Module):
    """Read/write pairs that stack each BERT block's query, key and value as one `(3 d, in)` matrix, as if fused."""
    pairs = []
    for name, block in model.named_modules():
        if name.endswith("attention.self"):
            parts = (block.query, block.key, block.value)

            def write(w: Tensor, parts=parts) -> None:
                for part, rows in zip(parts, w.chunk(GROUPS)):
                    part.weight.copy_(rows)

            pairs.append((f"{name}.query", (lambda parts=parts: torch.cat([p.weight.detach() for p in parts]).clone()), write))
    return pairs


def random_inputs(vocab: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (16, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, 16:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--sentences", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = []
    for model_type, (config, suffix) in TINY.items():
        model = AutoModel.from_config(AutoConfig.for_model(model_type, **config), attn_implementation="eager").eval()
        cases.append((f"{model_type} (tiny, random)", model, fused_layers(suffix), random_inputs(config["vocab_size"])))
    folder = resolve_model(DEFAULT_MODEL)
    with open(Path(os.environ["GLUE_DIR"]) / "SST-2" / "dev.tsv") as handle:  # report sets GLUE_DIR
        sentences = [row["sentence"] for row in csv.DictReader(handle, delimiter="\t")][: args.sentences]
    inputs = dict(AutoTokenizer.from_pretrained(folder)(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    minilm = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    cases.append(("all-MiniLM-L6-v2, Q K V stacked (SST-2 dev)", minilm, stacked_qkv, inputs))

    rows = []
    for label, model, fused, batch in cases:
        grams = input_grams(model, fused, batch)
        for method in ("svd", "svd_llm"):
            for keep_ratio in args.keep_ratios:
                one = output_error(model, fused, batch, keep_ratio, False, method, grams)
                split = output_error(model, fused, batch, keep_ratio, True, method, grams)
                rows.append([label, method, keep_ratio, one[2], split[2], one[0], split[0], one[1], split[1]])
                print(rows[-1], flush=True)
    header = ["model", "method", "keep ratio", "rank, one matrix", "rank per group, split", "weight error, one",
              "weight error, split", "output error, one", "output error, split"]
    body = (
        "Each fused `(3 d, in)` projection factorized as one matrix or as three `(d, in)` ones at the same parameter "
        "count (SVD, and SVD-LLM whitened by the Gram matrix of the same tokens' inputs); relative Frobenius errors of "
        "the weight and of the last hidden states (real tokens) with only those layers replaced.\n\n" + table(header, rows)
    )
    write_section("fused-projections", "A fused QKV projection: one matrix or split per group (issue 37)",
                  "python benchmarks/fused_projections.py", body, results="families.md")


if __name__ == "__main__":
    main()
