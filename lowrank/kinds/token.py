"""The `token` kind: a tag per word (named-entity recognition), CoNLL-2003 and the user's CoNLL or JSONL files.

Each word's tag goes on its first sub-token; the other sub-tokens get -100, so
the loss and the scores see one prediction per word, as the CoNLL evaluation
does. The score is entity-level F1 in seqeval's default (CoNLL) mode: an entity
counts only if its type and its whole span match.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lowrank.data.custom import custom_files
from lowrank.data.catalog import DataError, SplitFile, TaskSpec, check_utf8, iter_records
from lowrank.kinds.registry import Rows, TaskKind, register_kind

IGNORED = -100  # the label cross-entropy skips: later sub-tokens, special tokens, padding
METRICS = ("f1", "precision", "recall", "accuracy")


def tag_scores(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity F1, precision and recall (seqeval, CoNLL mode) and token accuracy; `score` is the F1."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    results = {
        "f1": float(f1_score(gold, predicted, zero_division=0)),
        "precision": float(precision_score(gold, predicted, zero_division=0)),
        "recall": float(recall_score(gold, predicted, zero_division=0)),
        "accuracy": float(accuracy_score(gold, predicted)),
    }
    return {**results, "score": results["f1"]}


def _read_conll(path: Path, tag_ids: Mapping[str, int]) -> Rows:
    """Sentences of a `token tag` file (a blank line ends one; `-DOCSTART-` lines are skipped)."""
    check_utf8(path)
    rows: Rows = []
    tokens: list[str] = []
    tags: list[int] = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, text in enumerate(handle, start=1):
            fields = text.split()
            if not fields or fields[0] == "-DOCSTART-":
                if tokens:
                    rows.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
                continue
            if len(fields) != 2:
                raise DataError(f"{path}:{number}: expected 2 columns (token and tag), found {len(fields)}")
            tokens.append(fields[0])
            tags.append(_tag_id(fields[1], tag_ids, path, number))
    if tokens:
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def _tag_id(tag: Any, tag_ids: Mapping[str, int], path: Path, line: int) -> int:
    if tag not in tag_ids:
        raise DataError(f"{path}:{line}: tag {tag!r} is not one of {', '.join(tag_ids)}")
    return tag_ids[tag]


def _read_jsonl(path: Path, tag_ids: Mapping[str, int], tokens_key: str, tags_key: str) -> Rows:
    """One sentence per line: `{"tokens": [...], "tags": [...]}` (the keys as configured)."""
    rows: Rows = []
    for number, record in iter_records(path, _JSONL):
        tokens, tags = record.get(tokens_key), record.get(tags_key)
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
            raise DataError(f"{path}:{number}: {tokens_key!r} should be a non-empty list of words")
        if not isinstance(tags, list) or len(tags) != len(tokens):
            raise DataError(f"{path}:{number}: {tags_key!r} should be a list of {len(tokens)} tags, one per word")
        rows.append({"tokens": tokens, "tags": [_tag_id(t, tag_ids, path, number) for t in tags]})
    return rows


_JSONL = SplitFile("", ("tokens",), "tags", format="jsonl")
WORD = re.compile(r"\S+")


class TokenKind(TaskKind):
    name = "token"
    auto_class = "AutoModelForTokenClassification"
    outputs = {"logits": {0: "batch", 1: "sequence"}}
    targets = ("labels",)
    summary = "a tag per word, e.g. named entities (CoNLL columns or JSONL); score: entity F1 (seqeval)"

    def read_rows(self, spec: Any, path: Any, layout: Any) -> Rows:
        tag_ids = {name: i for i, name in enumerate(spec.label_names)}
        if layout.format == "conll":
            return _read_conll(Path(path), tag_ids)
        return _read_jsonl(Path(path), tag_ids, layout.text_columns[0], layout.label_column)

    def raw_features(self, spec: Any) -> Any:
        from datasets import Features, Sequence, Value

        return Features({"tokens": Sequence(Value("string")), "tags": Sequence(Value("int64"))})

    def encode(self, dataset: Any, spec: Any, tokenizer: Any, max_length: int, split: str) -> Any:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"model.name: a token task needs a fast tokenizer (word ids), {type(tokenizer).__name__} is not")

        def encode(batch: dict[str, list]) -> dict[str, list]:
            words = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
            labels = [first_subtoken_labels(words.word_ids(i), tags) for i, tags in enumerate(batch["tags"])]
            return {**words, "labels": labels}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {split}")

    def collator(self, tokenizer: Any) -> Any:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, return_tensors="pt")

    def custom_task(self, custom: Any) -> Any:
        from lowrank.config.base import check

        check(bool(custom.label_names), "data.custom.label_names", "a token task needs its tags, e.g. [O, B-PER, I-PER]")

        def layout(path: str) -> SplitFile:
            fmt = "jsonl" if Path(path).suffix.lower() in (".jsonl", ".json") else "conll"
            return SplitFile(str(path), (custom.text_a or "tokens",), custom.label or "tags", format=fmt)

        files, share = custom_files(custom.train_file, custom.eval_file, custom.eval_share, layout)
        return TaskSpec("custom", ("tokens",), tuple(map(str, custom.label_names)), METRICS, ("validation",), files, kind=self.name,
                        eval_from_train=share)

    def head_kwargs(self, spec: Any) -> dict[str, Any]:
        names = spec.label_names
        return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}

    def misclassified(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sentences with at least one word tagged wrong."""
        with torch.no_grad():
            tags = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)  # (batch, length)
        labels = batch["labels"]
        return ((tags != labels) & (labels != IGNORED)).any(-1).nonzero().flatten()

    def metrics(self, spec: Any, outputs: Mapping[str, torch.Tensor], dataset: Any) -> dict[str, float]:
        predicted, gold = [], []
        for logits, labels in zip(outputs["logits"].argmax(-1).tolist(), outputs["labels"].tolist()):
            kept = [(p, g) for p, g in zip(logits, labels) if g != IGNORED]
            predicted.append([spec.label_names[p] for p, _ in kept])
            gold.append([spec.label_names[g] for _, g in kept])
        return tag_scores(predicted, gold)

    def baseline(self, spec: Any, dataset: Any) -> float:
        """Every word tagged with the most frequent tag (`O`): no entity found, F1 0."""
        gold = [[spec.label_names[g] for g in row if g != IGNORED] for row in dataset["labels"]]
        counts: dict[str, int] = {}
        for row in gold:
            for tag in row:
                counts[tag] = counts.get(tag, 0) + 1
        common = max(counts, key=counts.__getitem__) if counts else spec.label_names[0]
        return tag_scores([[common] * len(row) for row in gold], gold)["score"]

    def serving_schema(self, spec: Any) -> tuple[list, list, dict]:
        entity = [("string", "type"), ("long", "start"), ("long", "end"), ("string", "text"), ("double", "score")]
        return [("string", "text")], [(entity, "entities")], {"text": ["John Smith flew to Paris with Air France."]}

    def text_columns(self, frame: Any, pair: bool) -> list[str]:
        return [] if "words" in frame.columns else ["text"]  # pre-split `words` are lists, joined by serve

    def serve(self, model: nn.Module, tokenizer: Any, frame: Any, max_length: int, batch_size: int, pair: bool) -> Rows:
        """`entities`: each with its type, character span in the text, text and score (mean probability of its tags).

        The input is `text` (split at white space) or `words` (a list of words per row, joined by one space)."""
        column = "words" if "words" in frame.columns else "text"
        if column not in frame.columns:
            raise ValueError(f"input needs the column 'text' (or 'words'); got {list(frame.columns)}")
        texts = [" ".join(v) if column == "words" else str(v) for v in frame[column]]
        rows: Rows = []
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            spans = [[(m.start(), m.end()) for m in WORD.finditer(t)] for t in batch]
            words = [[t[a:b] for a, b in s] for t, s in zip(batch, spans)]
            encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            with torch.inference_mode():
                probs = model(**encoded).logits.float().softmax(-1)
            for i, (text, word_spans) in enumerate(zip(batch, spans)):
                firsts = first_subtokens(encoded.word_ids(i))
                best, tags = probs[i].max(-1)
                word_tags = [model.config.id2label[int(tags[t])] for t in firsts]
                word_scores = [float(best[t]) for t in firsts]
                rows.append({"entities": entities(text, word_spans, word_tags, word_scores)})
        return rows


def first_subtokens(word_ids: Sequence[int | None]) -> list[int]:
    """The position of each word's first sub-token, in word order (words cut off by truncation are absent)."""
    seen: set[int] = set()
    firsts = []
    for position, word in enumerate(word_ids):
        if word is not None and word not in seen:
            seen.add(word)
            firsts.append(position)
    return firsts


def first_subtoken_labels(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
    """A word's tag on its first sub-token, IGNORED everywhere else."""
    labels = [IGNORED] * len(word_ids)
    for position in first_subtokens(word_ids):
        labels[position] = tags[word_ids[position]]
    return labels


def entities(text: str, word_spans: Sequence[tuple[int, int]], tags: Sequence[str], scores: Sequence[float]) -> Rows:
    """The entities of a tagged sentence (seqeval's reading of IOB tags), with character spans in `text`."""
    from seqeval.metrics.sequence_labeling import get_entities

    found = []
    for kind, first, last in get_entities(list(tags)):
        start, end = word_spans[first][0], word_spans[last][1]
        score = sum(scores[first:last + 1]) / (last - first + 1)
        found.append({"type": kind, "start": start, "end": end, "text": text[start:end], "score": score})
    return found


TOKEN = register_kind(TokenKind())
