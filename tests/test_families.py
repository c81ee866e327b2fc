"""The support matrix: every common Transformer family, built tiny from its config, through targets,
the four methods, save and load, ONNX export and the MLflow pyfunc. docs/your-data-and-model.md's "Supported model
families" table is generated from FAMILIES (`python tests/test_families.py`) and checked against it.

Decoders are tested with their sequence-classification head (GPT2ForSequenceClassification, ...),
which needs `pad_token_id`: the causal-LM task kind is not there yet.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from conftest import REPO, VOCAB as CHARS
from lowrank.api import compress_
from lowrank.config import InputError, ModelConfig, load_params
from lowrank.evaluation import count_parameters
from lowrank.io.checkpoints import load_compressed, save_compressed
from lowrank.io.export import export_onnx
from lowrank.io.models import check_model
from lowrank.linalg.solvers import get_solver
from lowrank.methods import get_method
from lowrank.modules.layers import FactorizedLinear, out_in
from lowrank.modules.matching import find_targets, matrix_type, require_targets
from lowrank.modules.surgery import dense_weights, factorize_model
from lowrank.train.loop import LossWeights, attention_maps, weighted_loss
from lowrank.train.importance import collect_importance
from lowrank.train.rank_search import measure

VOCAB = 100
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
               max_position_embeddings=64)
DECODER = dict(ENCODER, num_key_value_heads=1, pad_token_id=0)  # grouped-query attention: K and V narrower than Q
BERT_TYPES = {"query", "key", "value", "attention_output", "ffn_in", "ffn_out"}
FUSED_TYPES = {"qkv", "attention_output", "ffn_in", "ffn_out"}
GATED_TYPES = BERT_TYPES | {"ffn_gate"}
METHODS = ("svd", "tfwsvd", "asvd", "svd_llm")
KEEP_RATIO = 0.5


@dataclass(frozen=True)
class Family:
    """One row of the matrix: the config, the matrix types each block must yield, how many blocks hold targets."""

    model_type: str
    config: dict
    types: frozenset[str]
    blocks: int = 2
    onnx: str = ""  # empty: it exports with parity; else why not

    @property
    def layers(self) -> int:
        return self.blocks * len(self.types)


FAMILIES = {f.model_type: f for f in [
    Family("bert", ENCODER, frozenset(BERT_TYPES)),
    Family("roberta", dict(ENCODER, pad_token_id=1), frozenset(BERT_TYPES)),
    Family("xlm-roberta", dict(ENCODER, pad_token_id=1), frozenset(BERT_TYPES)),
    Family("distilbert", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=64),
           frozenset(BERT_TYPES)),
    Family("albert", dict(ENCODER, embedding_size=16), frozenset(BERT_TYPES), blocks=1),  # one layer shared by both blocks
    Family("deberta-v2", dict(ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                              max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True,
                              position_biased_input=False), frozenset(BERT_TYPES)),  # DeBERTa-v3's settings
    Family("electra", dict(ENCODER, embedding_size=16), frozenset(BERT_TYPES)),
    Family("mpnet", ENCODER, frozenset(BERT_TYPES)),
    Family("modernbert", dict(ENCODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
           frozenset({"qkv", "attention_output", "ffn_gate_in", "ffn_out"})),
    Family("gpt2", dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=VOCAB, n_positions=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2), frozenset(FUSED_TYPES)),
    Family("llama", DECODER, frozenset(GATED_TYPES)),
    Family("qwen2", DECODER, frozenset(GATED_TYPES)),
    Family("mistral", DECODER, frozenset(GATED_TYPES)),
]}


def build(model_type: str) -> torch.nn.Module:
    """The family's tiny sequence classifier, seeded, in eval mode."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **FAMILIES[model_type].config, num_labels=2)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()


def batches() -> list[dict[str, torch.Tensor]]:
    """Two padded batches with labels (token 0 is never drawn: it is the decoders' padding)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        input_ids = torch.randint(3, VOCAB, (4, 12), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, 8:] = 0
        out.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1, 1, 0])})
    return out


def logits(model: torch.nn.Module) -> torch.Tensor:
    batch = batches()[0]
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@lru_cache(maxsize=None)
def importance(model_type: str) -> dict:
    """Fisher, Taylor and the input statistics of the family's targets, one pass (cached per family)."""
    model = build(model_type)
    return {k: v.scores for k, v in collect_importance(model, batches(), find_targets(model), progress=False, activations=True).items()}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_default_targets_are_every_projection_of_the_blocks_and_nothing_else(model_type: str) -> None:
    family, model = FAMILIES[model_type], build(model_type)
    names = require_targets(model)
    assert len(names) == family.layers
    assert {matrix_type(name) for name in names} == family.types
    assert not [name for name in names if re.search(r"embed|norm|head|classifier|pooler|score", name)]
    linear = find_targets(model, r".+", [])  # every Linear-like layer: those left out are outside the blocks
    assert all(re.search(r"embed|head|classifier|pooler|score", name) for name in set(linear) - set(names))


@pytest.mark.parametrize("model_type", ["albert", "gpt2", "qwen2"])
def test_targets_are_found_on_the_meta_device_as_on_the_cpu(model_type: str) -> None:
    """A preflight check builds the model without weights: the targets come from names and types alone."""
    config = AutoConfig.for_model(model_type, **FAMILIES[model_type].config, num_labels=2)
    with torch.device("meta"):
        empty = AutoModelForSequenceClassification.from_config(config)
    assert require_targets(empty) == find_targets(build(model_type))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_method_compresses_the_family_within_budget_and_saves_and_loads(model_type: str, method: str, tmp_path: Path) -> None:
    dense = build(model_type)
    model = copy.deepcopy(dense)
    names = find_targets(model)
    before = count_parameters(model, names)
    kind = get_method(method).importance
    report = compress_(model, method=method, keep_ratio=KEEP_RATIO, importance=None if kind == "none" else importance(model_type)[kind],
                       solver_steps=2)
    after = count_parameters(model, names)
    # The budget: the targets' weights shrink to the ratio reached, never past the one asked for, each shared weight once.
    assert 0.4 <= report.keep_ratio_reached <= KEEP_RATIO
    assert after["target_linear"] == round(report.keep_ratio_reached * before["target_linear"])
    assert before["total"] - after["total"] == before["target_linear"] - after["target_linear"]
    assert len(report.ranks) == FAMILIES[model_type].layers
    # The swap computes what the factors say: the dense model with W := A B (transposed back for a Conv1D) agrees.
    modules = dict(dense.named_modules())
    for name, layer in model.named_modules():
        if isinstance(layer, FactorizedLinear):
            with torch.no_grad():
                modules[name].weight.copy_(out_in(modules[name], layer.up.weight @ layer.down.weight))
    torch.testing.assert_close(logits(model), logits(dense), rtol=1e-4, atol=1e-5)
    save_compressed(model, tmp_path / "model", method=method, targets=names)
    # (atol: the loaded model runs transformers' default attention, the built one eager)
    torch.testing.assert_close(logits(load_compressed(tmp_path / "model")), logits(model), rtol=1e-5, atol=1e-6)


def test_the_rank_search_measures_a_conv1d_as_factorizing_it_does() -> None:
    """The search puts `A B` in place of a weight for a moment: a Conv1D's must go in transposed (c_proj is square,
    so the wrong way round would run, and measure another matrix)."""
    model, name = build("gpt2"), "transformer.h.0.attn.c_proj"

    def loss_fn(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(sum(m(**batch).loss for batch in batches()))

    def factorize(layer: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return get_solver("truncated_svd")(dense_weights(model, [layer])[layer], rank)

    base, increases = measure(model, [name], {name: [4]}, factorize, loss_fn, replay=False)
    factorized = copy.deepcopy(model)
    factorize_model(factorized, {name: factorize(name, 4)})
    assert base == pytest.approx(loss_fn(model))
    assert increases[name][4] == pytest.approx(loss_fn(factorized) - base, rel=1e-4, abs=1e-6)
    assert increases[name][4] != 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_default_two_stage_distillation_works_on_the_family(model_type: str) -> None:
    """params.yaml's + ft distils by default (stage 1 hidden states and attention maps, stage 2 logits): every family
    must yield both terms: zero against itself, finite after a cut, stage 1's positive."""
    distill = load_params(REPO / "params.yaml").finetune_compressed.distill
    assert distill.enabled and distill.intermediate.epochs > 0
    teacher = build(model_type)
    student, batch = copy.deepcopy(teacher), batches()[0]
    stages = [LossWeights.intermediate(distill), LossWeights.predictions(distill)]
    with torch.no_grad(), attention_maps([student, teacher], True):
        same = [float(weighted_loss(student, batch, teacher, replace(w, task=0.0))) for w in stages]
        compress_(student, method="svd", keep_ratio=KEEP_RATIO)
        cut = [float(weighted_loss(student, batch, teacher, replace(w, task=0.0))) for w in stages]
    assert same == pytest.approx([0.0, 0.0], abs=1e-6)
    assert torch.isfinite(torch.tensor(cut)).all(), cut
    assert cut[0] > 0 and cut[1] >= -1e-6  # a random head's logits barely move, so its KL may round to 0, never below


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_compressed_family_exports_to_onnx_with_parity(model_type: str, tmp_path: Path) -> None:
    family, model = FAMILIES[model_type], build(model_type)
    compress_(model, method="svd", keep_ratio=KEEP_RATIO)
    if family.onnx:
        pytest.skip(family.onnx)
    assert export_onnx(model, tmp_path / "model.onnx")["max_abs_diff"] < 1e-4


def test_a_family_the_defaults_miss_gets_one_line_naming_it_and_the_key() -> None:
    """SqueezeBERT's blocks are grouped nn.Conv1d layers, not Linear ones: the defaults find nothing there."""
    config = AutoConfig.for_model("squeezebert", **ENCODER, embedding_size=32)
    model = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(InputError) as caught:
        require_targets(model)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("factorize.targets: no Linear layer of this 'squeezebert' model")
    assert "transformer.pooler.dense, classifier" in message  # what it could target instead
    assert require_targets(model, r".*\.pooler\.dense", "classifier") == ["transformer.pooler.dense"]


def test_a_checkpoint_with_its_own_code_is_refused_unless_trusted(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "fancy", "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig"}}))
    (tmp_path / "configuration_fancy.py").write_text(
        "from transformers import PretrainedConfig\n\nclass FancyConfig(PretrainedConfig):\n    model_type = 'fancy'\n")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"^model\.name: .* ships its own model code, which lowrank runs only when "
                                         r"model\.trust_remote_code is true \(off by default\)$"):
        check_model(ModelConfig(name=str(tmp_path)))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_pyfunc_serves_the_compressed_family(model_type: str, tmp_path: Path) -> None:
    """MLflow's pyfunc (tasks/pyfunc_model.py) loads the saved folder and predicts what the model predicts."""
    import pandas as pd
    from transformers import BertTokenizerFast

    pyfunc = pytest.importorskip("tasks.pyfunc_model")
    (tmp_path / "vocab.txt").write_text("\n".join(CHARS) + "\n")  # char-level: the ids fit every family's tiny vocabulary
    # No token types: GPT-2 would add the embedding of token 0 to every position (its own tokenizer gives none).
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=True,
                                  model_input_names=["input_ids", "attention_mask"])
    model = build(model_type)
    compress_(model, method="svd", keep_ratio=KEEP_RATIO)
    folder = save_compressed(model, tmp_path / "model", method="svd", targets=find_targets(model), tokenizer=tokenizer)
    served = pyfunc.LowrankClassifier()
    served.load_context(SimpleNamespace(artifacts={pyfunc.MODEL_ARTIFACT: str(folder)}))
    texts = ["a gripping, funny film", "dull", "the plot goes nowhere at all"]
    got = served.predict(None, pd.DataFrame({"text": texts}))
    # The pyfunc's own tokenizer: transformers may load another class for the family than the one saved (Qwen2's).
    encoded = served.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.softmax(-1)
    assert list(got["label"]) == [model.config.id2label[int(i)] for i in probs.argmax(-1)]
    torch.testing.assert_close(torch.tensor(got["score"].to_numpy()), probs.max(-1).values.double(), rtol=1e-4, atol=1e-5)


TYPE_NAMES = {"query": "Q", "key": "K", "value": "V", "qkv": "QKV (fused)", "attention_output": "attention out",
              "ffn_gate": "FFN gate", "ffn_gate_in": "FFN gate+in (fused)", "ffn_in": "FFN in", "ffn_out": "FFN out"}
README_START, README_END = "<!-- families:start -->", "<!-- families:end -->"


def readme_table() -> str:
    """The README's support matrix, from FAMILIES: what the tests above check for each family."""
    lines = ["| Family (`model_type`) | Targets per block (default) | Methods | Save / load | ONNX | pyfunc |",
             "|---|---|---|---|---|---|"]
    for family in FAMILIES.values():
        types = ", ".join(TYPE_NAMES[t] for t in TYPE_NAMES if t in family.types)
        shared = " (one layer shared by all blocks)" if family.blocks == 1 else ""
        onnx = f"no: {family.onnx}" if family.onnx else "yes"
        lines.append(f"| `{family.model_type}` | {types}{shared} | {', '.join(METHODS)} | yes | {onnx} | yes |")
    return "\n".join(lines)


def test_the_readme_matrix_is_what_the_tests_check() -> None:
    readme = (REPO / "docs" / "your-data-and-model.md").read_text()
    section = readme[readme.index(README_START) + len(README_START):readme.index(README_END)].strip()
    assert section == readme_table(), "the docs' families table (docs/your-data-and-model.md) is out of date: paste `python tests/test_families.py`"


if __name__ == "__main__":
    print(readme_table())
