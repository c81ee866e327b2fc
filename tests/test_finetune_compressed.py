"""+ ft on the tiny pipeline: scored from its start, distilled from the dense model when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import GLUE_DIR, tiny_params
from lowrank.config import load_params
from lowrank.pipeline import get_stage


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_distilled_ft_starts_from_the_factorized_score(tmp_path: Path, tiny_model_dir: Path, hidden_weight: float) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    params = load_params(tiny_params(
        tmp_path, tiny_model_dir, GLUE_DIR, evaluate={"latency": False},
        finetune_compressed={"epochs": 2, "batch_size": 16, "lr": 1e-3,
                             "distill": {"enabled": True, "weight": 0.5, "hidden_weight": hidden_weight}},
    ))
    results = {name: get_stage(name).run(params) for name in
               ("prepare", "finetune", "fisher", "factorize", "evaluate_factorized", "finetune_compressed")}
    metrics = results["finetune_compressed"].metrics
    history = results["finetune_compressed"].info["history"]
    assert [row["epoch"] for row in history] == [0, 1, 2]
    # epoch 0 is the factorized model on the selection split (the reported split is the evaluate stages' alone)
    from lowrank.io.checkpoints import load_compressed
    from lowrank.pipeline import PreparedData

    factorized = load_compressed(results["factorize"].outputs["model"])
    selected = PreparedData.open(Path(results["prepare"].outputs["data"])).select_fn(64)(factorized)["score"]
    assert metrics["start_score"] == pytest.approx(selected)
    assert metrics["best_score"] >= metrics["start_score"]  # never worse than the start
    assert 0 < metrics["majority_score"] < 1 and metrics["collapsed"] in (0.0, 1.0)
