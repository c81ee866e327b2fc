"""Two-stage distillation and gradual compression in + ft: the losses against their definitions, the phases
of a run, and a gradual run's end point."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification

from conftest import GLUE_DIR, tiny_bert_config, tiny_params
from lowrank import compress_
from lowrank.config import DistillationConfig, IntermediateDistillation, TrainConfig, load_params
from lowrank.train.hooks import TrainHook
from lowrank.train.loop import LossWeights, attention_maps, train, weighted_loss
from test_training import _batches

HIDDEN = LossWeights(task=0.0, hidden=1.0)
ATTENTION = LossWeights(task=0.0, attention=1.0)


def _pair() -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = tiny_bert_config()
    teacher = BertForSequenceClassification(config).eval()
    return teacher, copy.deepcopy(teacher), _batches(config.vocab_size, n=1)[0]


@torch.no_grad()
def test_the_intermediate_losses_are_zero_for_the_teacher_itself_and_positive_after_a_factorization() -> None:
    teacher, student, batch = _pair()
    with attention_maps([student, teacher], True):
        assert float(weighted_loss(student, batch, teacher, HIDDEN)) == 0.0
        assert float(weighted_loss(student, batch, teacher, ATTENTION)) == 0.0
        compress_(student, method="svd", keep_ratio=0.3)
        hidden, attention = float(weighted_loss(student, batch, teacher, HIDDEN)), float(weighted_loss(student, batch, teacher, ATTENTION))
        s = student(**batch, output_hidden_states=True, output_attentions=True)
        t = teacher(**batch, output_hidden_states=True, output_attentions=True)
    assert hidden > 0 and attention > 0
    # each is the MSE per block, averaged over the blocks (the embeddings' output left out)
    blocks = len(t.attentions)
    assert hidden == pytest.approx(sum(float(((a - b) ** 2).mean()) for a, b in zip(s.hidden_states[1:], t.hidden_states[1:])) / blocks, rel=1e-5)
    assert attention == pytest.approx(sum(float(((a - b) ** 2).mean()) for a, b in zip(s.attentions, t.attentions)) / blocks, rel=1e-5)
    assert student.config._attn_implementation == "sdpa"  # the models' own attention is back after the block


@torch.no_grad()
def test_stage_1_weighs_its_terms_and_stage_2_is_the_logits_distillation() -> None:
    teacher, student, batch = _pair()
    compress_(student, method="svd", keep_ratio=0.3)
    distill = DistillationConfig(enabled=True, weight=0.25, temperature=3.0,
                                 intermediate=IntermediateDistillation(epochs=1, hidden_weight=2.0, attention_weight=5.0, task_weight=0.5))
    with attention_maps([student, teacher], True):
        task = float(student(**batch).loss)
        hidden, attention = float(weighted_loss(student, batch, teacher, HIDDEN)), float(weighted_loss(student, batch, teacher, ATTENTION))
        stage1 = float(weighted_loss(student, batch, teacher, LossWeights.intermediate(distill)))
    assert stage1 == pytest.approx(0.5 * task + 2.0 * hidden + 5.0 * attention, rel=1e-5)
    from lowrank.train.loop import distillation_loss

    kd = float(distillation_loss(student(**batch).logits, teacher(**batch).logits, 3.0))
    assert float(weighted_loss(student, batch, teacher, LossWeights.predictions(distill))) == pytest.approx(0.75 * task + 0.25 * kd, rel=1e-5)


class _Watch(TrainHook):
    """The classifier's weight at the first step of each phase."""

    def __init__(self, switch: int) -> None:
        self.switch, self.seen = switch, {}

    def before_forward(self, model: torch.nn.Module, step: int) -> None:
        if step in (0, self.switch):
            self.seen[step] = model.classifier.weight.detach().clone()


def test_a_two_stage_run_matches_the_inside_first_then_the_predictions() -> None:
    teacher, student, _ = _pair()
    compress_(student, method="svd", keep_ratio=0.3)
    config = tiny_bert_config()
    loader = DataLoader(_batches(config.vocab_size), batch_size=None)  # 4 batches an epoch
    distill = DistillationConfig(enabled=True, intermediate=IntermediateDistillation(epochs=2))
    watch = _Watch(switch=8)
    scores = iter([0.5, 0.6, 0.7, 0.4, 0.55])
    result = train(student, loader, TrainConfig(epochs=2, lr=1e-3, warmup_ratio=0.0), evaluate=lambda m: {"score": next(scores)},
                   teacher=teacher, distill=distill, hooks=[watch], score_start=True, progress=False)
    assert result.steps == 16
    assert [(row["epoch"], row.get("stage")) for row in result.history] == [(0, None), (1, 1), (2, 1), (3, 2), (4, 2)]
    assert result.best_epoch == 2  # keep_best chooses among both stages
    # stage 1 (no task loss, no logits) leaves the classifier as it was: no gradient reaches it, so no decay either
    assert torch.equal(watch.seen[0], watch.seen[8])
    assert student.config._attn_implementation == "sdpa"


def test_no_stage_1_is_the_one_stage_run_of_before() -> None:
    """`intermediate.epochs: 0` trains bit for bit as a DistillationConfig without stage 1 always has."""
    config = tiny_bert_config()
    loader = DataLoader(_batches(config.vocab_size), batch_size=None)
    finals = []
    for distill in (DistillationConfig(enabled=True, hidden_weight=1.0),
                    DistillationConfig(enabled=True, hidden_weight=1.0, intermediate=IntermediateDistillation(epochs=0, hidden_weight=9.0))):
        teacher, student, _ = _pair()
        train(student, loader, TrainConfig(epochs=1, lr=1e-3), teacher=teacher, distill=distill, progress=False)
        finals.append(student.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_a_gradual_run_reaches_exactly_the_one_cut_parameter_count(tmp_path: Path, tiny_model_dir: Path) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    from lowrank.evaluation import count_parameters
    from lowrank.io.checkpoints import layer_ranks, load_compressed
    from lowrank.pipeline import get_stage

    params = load_params(tiny_params(
        tmp_path, tiny_model_dir, GLUE_DIR, evaluate={"latency": False},
        factorize={"method": "svd", "keep_ratio": 0.3},
        finetune_compressed={"epochs": 1, "batch_size": 16, "lr": 1e-3, "schedule": [0.7, 0.5], "schedule_epochs": 1,
                             "distill": {"enabled": True, "intermediate": {"epochs": 1}}},
    ))
    results = {name: get_stage(name).run(params) for name in ("prepare", "finetune", "fisher", "factorize", "finetune_compressed")}
    one_cut = load_compressed(results["factorize"].outputs["model"])
    gradual = load_compressed(results["finetune_compressed"].outputs["model"])
    assert layer_ranks(gradual) == layer_ranks(one_cut)
    targets = list(layer_ranks(one_cut))
    assert count_parameters(gradual, targets) == count_parameters(one_cut, targets)
    report = json.loads((Path(params.paths.metrics) / "finetune_compressed.json").read_text())
    assert [c["keep_ratio"] for c in report["cuts"]] == [0.7, 0.5] and report["total_epochs"] == 2 * 1 + 1 + 1
    history = results["finetune_compressed"].info["history"]
    assert [row["stage"] for row in history[1:]] == [1, 2]  # after the last cut: stage 1, then stage 2
    assert gradual.config.lowrank["schedule"] == [0.7, 0.5, 0.3]
