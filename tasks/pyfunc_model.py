"""A lowrank model as an MLflow pyfunc, logged as code (MLflow's "models from code").

MLflow would otherwise cloudpickle a PythonModel instance into the model and
unpickle it at load time; logged as this file, the model holds no pickle at
all: MLflow runs this file, and the weights come from the model folder (an
artifact of the logged model) through `lowrank.load_compressed`, safetensors
only.

predict takes a DataFrame and returns one row per input, as the model's task
kind serves it (lowrank/kinds): for a classifier, `text` (and `text_pair` for
pair tasks, as transformers' pipelines name them) in, `label` (the class name)
and `score` (its probability) out, or for a regression `score` alone; for a
tagger, `text` (or `words`) in, `entities` out; for a QA reader, `question` and
`context` in, `answer`, its `start` and `end` and `score` out. The text columns
are checked first by `tasks.serving.validate_text_rows` (400 or 413 otherwise).
The rows are tokenized and batched as the evaluate stage does (truncated to the
run's `max_length`, padded per batch), so the predictions are the evaluation's.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

from tasks.serving import Limits, validate_text_rows

MODEL_ARTIFACT = "model"  # the key of the model folder among the logged model's artifacts
SERVING_ARTIFACT = "serving"  # a JSON file: max_length, batch_size, text_pair, method (an artifact: MLflow would log a
# model_config as the run's params, where two models of one run with different methods clash)


class LowrankClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from lowrank import load_compressed
        from lowrank.kinds import kind_of_model

        folder = Path(context.artifacts[MODEL_ARTIFACT])
        serving = context.artifacts.get(SERVING_ARTIFACT)
        config = json.loads(Path(serving).read_text()) if serving else {}
        check_folder(folder, expect_recipe=config.get("method", "dense") != "dense")
        self.model = load_compressed(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.max_length = int(config.get("max_length", 128))
        self.batch_size = int(config.get("batch_size", 64))
        self.pair = bool(config.get("text_pair", False))
        self.kind = kind_of_model(self.model)
        self.limits = Limits.from_env()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        validate_text_rows(frame, self.kind.text_columns(frame, self.pair), self.limits)
        return pd.DataFrame(self.kind.serve(self.model, self.tokenizer, frame, self.max_length, self.batch_size, self.pair))


def check_folder(folder: Path, expect_recipe: bool) -> None:
    """A clear error for a folder that is not a model lowrank wrote (before transformers fails somewhere deeper)."""
    config = folder / "config.json"
    if not config.is_file() or not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder}: not a lowrank model folder (it needs config.json and model.safetensors)")
    if expect_recipe and not json.loads(config.read_text()).get("lowrank"):
        raise ValueError(f"{folder}/config.json: no lowrank recipe (the `lowrank` entry with method and ranks); "
                         "a compressed model must be saved with lowrank.save_compressed")


set_model(LowrankClassifier())
