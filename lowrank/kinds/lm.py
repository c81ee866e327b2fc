"""The `lm` kind: causal language modelling on the user's text, scored by perplexity (lower is better).

Data: a `.jsonl`/`.json` file holds one document per line as `{"text": ...}` (the key is `data.custom.text_a`);
any other file is plain text, one document per line (blank lines skipped). Each document is tokenized and cut
into consecutive windows of `data.max_length` tokens (no document is packed with another, no token is dropped
but a last window of a single token, which predicts nothing). Labels are the input ids with padding at -100:
the model's own next-token loss trains, and Fisher, Taylor and the activation statistics see real tokens only.
The score is the perplexity of the held-out text: exp of the mean next-token NLL over its real tokens (a window's
first token is context only, as in the model's own loss). Evaluation keeps each token's NLL, not its logits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from lowrank.data.custom import custom_files
from lowrank.data.catalog import DataError, SplitFile, TaskSpec, check_utf8, iter_records
from lowrank.kinds.registry import Rows, TaskKind, register_kind

IGNORED = -100  # the label the next-token loss skips: padding
MAX_NEW_TOKENS = 32  # what the served model generates when a request does not say


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T): at position t the NLL of token t + 1, as the causal LM's own loss reads the logits (B, T, V); 0 where no
    real token follows (the last position, padding)."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].to(logits.device), ignore_index=IGNORED, reduction="none")
    return F.pad(nll, (0, 1))


def perplexity_metrics(nll: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """`perplexity` = exp(mean NLL per real token) and that mean NLL (`nll`, nats), from `token_nll`'s (B, T); `score`
    is the perplexity."""
    real = labels[:, 1:] != IGNORED
    count = int(real.sum())
    if count == 0:
        raise ValueError("no token to predict: every evaluation row is shorter than two tokens")
    mean = float(nll[:, :-1][real].double().sum()) / count
    return {"perplexity": math.exp(mean), "nll": mean, "score": math.exp(mean)}


def read_documents(path: Path, key: str | None) -> Rows:
    """Documents of a text file (one per line) or of a JSONL file (`key` of each object); errors name `file:line`."""
    if key is not None:
        rows = []
        for number, record in iter_records(path, SplitFile(str(path), (key,), key, format="jsonl")):
            text = record.get(key)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{number}: {key!r} should be a non-empty string, got {text!r}")
            rows.append({"text": text})
        return rows
    check_utf8(path)
    with open(path, encoding="utf-8-sig") as handle:
        return [{"text": line.rstrip("\n")} for line in handle if line.strip()]


def pad_id(tokenizer: Any) -> int:
    """The id padding is written with (causal LM tokenizers often have none: then end-of-text; it is masked anyway)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


class LMCollator:
    """Pads windows on the right (positions count from the first token) and masks the padding out of the labels."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad = pad_id(tokenizer)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            ids[row, :len(feature["input_ids"])] = torch.as_tensor(feature["input_ids"])
            mask[row, :len(feature["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORED)}


class LMKind(TaskKind):
    name = "lm"
    auto_class = "AutoModelForCausalLM"
    outputs = {"logits": {0: "batch", 1: "sequence"}}
    targets = ("labels",)
    goal = "min"
    summary = "causal language modelling on text files (one document per line, or JSONL 'text'); score: perplexity (lower is better)"

    def read_rows(self, spec: Any, path: Any, layout: Any) -> Rows:
        return read_documents(Path(path), layout.text_columns[0] if layout.format == "jsonl" else None)

    def raw_features(self, spec: Any) -> Any:
        from datasets import Features, Value

        return Features({"text": Value("string")})

    def encode(self, dataset: Any, spec: Any, tokenizer: Any, max_length: int, split: str) -> Any:
        def encode(batch: dict[str, list]) -> dict[str, list]:
            windows = [ids[i:i + max_length] for ids in tokenizer(batch["text"])["input_ids"] for i in range(0, len(ids), max_length)]
            windows = [w for w in windows if len(w) > 1]
            return {"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {split}")

    def collator(self, tokenizer: Any) -> Any:
        return LMCollator(tokenizer)

    def custom_task(self, custom: Any) -> Any:
        def layout(path: str) -> SplitFile:
            fmt = "jsonl" if Path(path).suffix.lower() in (".jsonl", ".json") else "text"
            return SplitFile(str(path), (custom.text_a or "text",), custom.text_a or "text", format=fmt)

        files, share = custom_files(custom.train_file, custom.eval_file, custom.eval_share, layout)
        return TaskSpec("custom", ("text",), None, ("perplexity",), ("validation",), files, kind=self.name, eval_from_train=share)

    def label_names(self, spec: Any) -> None:
        return None

    def distill_mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Distillation matches the next-token distributions at the real tokens only."""
        return batch.get("attention_mask")

    def misclassified(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise ValueError("fisher.only_misclassified: a language model has no wrong answers to select; set it to false")

    def condense(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each token's NLL (B, T) instead of its logits (B, T, V): 1000 windows of 128 tokens over a 32k vocabulary
        would hold 16 GB of logits."""
        return {"nll": token_nll(outputs["logits"], targets["labels"])}

    def metrics(self, spec: Any, outputs: Mapping[str, torch.Tensor], dataset: Any) -> dict[str, float]:
        """From the condensed `nll`, or from `logits` where a caller kept them."""
        nll = outputs["nll"] if "nll" in outputs else token_nll(outputs["logits"], outputs["labels"])
        return perplexity_metrics(nll, outputs["labels"])

    def baseline(self, spec: Any, dataset: Any) -> None:
        """None: a language model has no trivial answer whose exact score a collapse lands on, so none is flagged."""
        return None

    def serving_schema(self, spec: Any) -> tuple[list, list, dict]:
        inputs = [("string", "prompt"), ("long", "max_new_tokens", False)]
        return inputs, [("string", "text")], {"prompt": ["The quick brown fox"], "max_new_tokens": [MAX_NEW_TOKENS]}

    def text_columns(self, frame: Any, pair: bool) -> list[str]:
        return ["prompt"]

    def serve(self, model: nn.Module, tokenizer: Any, frame: Any, max_length: int, batch_size: int, pair: bool) -> Rows:
        """`text`: the greedy continuation of each `prompt` (without the prompt), `max_new_tokens` tokens at most
        (a column of the request, default 32); prompts are cut to their last `max_length` tokens."""
        if "prompt" not in frame.columns:
            raise ValueError(f"input needs the column 'prompt'; got {list(frame.columns)}")
        prompts = frame["prompt"].astype(str).tolist()
        wanted = frame["max_new_tokens"].fillna(MAX_NEW_TOKENS).astype(int).tolist() if "max_new_tokens" in frame.columns else [MAX_NEW_TOKENS] * len(prompts)
        rows: Rows = []
        for prompt, new in zip(prompts, wanted):  # one at a time: no padding, so no left-padding convention to rely on
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, -max_length:]
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(int(new), 0), do_sample=False,
                                     pad_token_id=pad_id(tokenizer))
            rows.append({"text": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
        return rows


LM = register_kind(LMKind())
