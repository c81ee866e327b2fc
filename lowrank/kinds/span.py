"""The `span` kind: extractive question answering on SQuAD-format files.

A context longer than `data.max_length` is cut into windows that overlap by a
quarter of it (less where a long question leaves less room); the model scores every token as the answer's start and end in
each window, and the answer is the best-scoring span over all windows of the
question (each window's scores log-softmaxed, so windows compare). Exact match
and F1 follow SQuAD's evaluation script (lower case, no punctuation, no
articles, single spaces); F1 is the score.
"""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lowrank.data.custom import custom_files
from lowrank.data.catalog import DataError, SplitFile, TaskSpec, check_utf8
from lowrank.kinds.registry import Rows, TaskKind, register_kind

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
MAX_ANSWER_TOKENS = 30  # as SQuAD's reference readers
CANDIDATES = 20  # best starts and ends tried per window


def window_stride(tokenizer: Any, questions: list[str], max_length: int) -> int:
    """Tokens two windows of one context share: a quarter of the window, less where the longest question
    leaves less room for context (the tokenizer needs the overlap below the context's share)."""
    longest = max((len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]), default=0)
    room = max_length - longest - tokenizer.num_special_tokens_to_add(pair=True)
    if room < 2:
        raise ValueError(f"data.max_length: {max_length} tokens leave no room for a context beside a question of {longest}")
    return min(max(1, max_length // 4), room - 1)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no a/an/the, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction, the best over the gold answers (none: the empty answer is right)."""
    golds = list(answers) or [""]
    exact = max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
    return exact, max(_f1(prediction, g) for g in golds)


def _f1(prediction: str, gold: str) -> float:
    predicted, truth = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not truth:
        return float(predicted == truth)
    common = sum((collections.Counter(predicted) & collections.Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def best_span(windows: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[Sequence[int]]]]) -> tuple[float, int, int] | None:
    """(log-probability, first char, end char) of the best answer over a question's windows; None if no span fits.

    Each window is (start logits, end logits, offsets), offsets (-1, -1) on tokens outside the context.
    """
    best = None
    for start_logits, end_logits, offsets in windows:
        length = len(offsets)
        starts = start_logits[:length].float().log_softmax(-1)
        ends = end_logits[:length].float().log_softmax(-1)
        for s in starts.topk(min(CANDIDATES, length)).indices.tolist():
            for e in ends.topk(min(CANDIDATES, length)).indices.tolist():
                if offsets[s][0] < 0 or offsets[e][0] < 0 or not 0 <= e - s < MAX_ANSWER_TOKENS:
                    continue
                score = float(starts[s] + ends[e])
                if best is None or score > best[0]:
                    best = (score, offsets[s][0], offsets[e][1])
    return best


def _line_of(text: str, qa: Mapping[str, Any]) -> int:
    """The line of a question in the JSON text: where its id (else its question) is written."""
    for key in ("id", "question"):
        if isinstance(qa.get(key), str):
            found = re.search(rf'"{key}"\s*:\s*{re.escape(json.dumps(qa[key]))}', text)
            if found:
                return text.count("\n", 0, found.start()) + 1
    return 1


def read_squad(path: Path) -> Rows:
    """Questions of a SQuAD-format file, each answer checked against its context; errors name `file:line`."""
    check_utf8(path)
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f'{path}:1: not SQuAD format: expected {{"data": [{{"paragraphs": [...]}}]}}')
    rows: Rows = []
    for paragraph in (p for article in data["data"] for p in article.get("paragraphs", [])):
        context = paragraph.get("context")
        for qa in paragraph.get("qas", []):
            where = f"{path}:{_line_of(text, qa)}"
            if not isinstance(context, str) or not context.strip():
                raise DataError(f"{where}: empty context")
            if not isinstance(qa.get("question"), str) or not qa["question"].strip():
                raise DataError(f"{where}: empty question")
            texts, starts = [], []
            for answer in qa.get("answers", []):
                start, said = answer.get("answer_start"), answer.get("text")
                if not isinstance(start, int) or not isinstance(said, str) or context[start:start + len(said)] != said:
                    found = context[start:start + len(said)] if isinstance(start, int) and isinstance(said, str) else None
                    raise DataError(f"{where}: answer_start {start!r} does not point at the answer {said!r} (the context there reads {found!r})")
                texts.append(said)
                starts.append(start)
            rows.append({"question": qa["question"], "context": context, "answer_texts": texts, "answer_starts": starts})
    return rows


def _positions(offsets: Sequence[tuple[int, int]], sequence_ids: Sequence[int | None], start: int | None, end: int) -> tuple[int, int]:
    """The answer's first and last token in one window, or (0, 0), the [CLS] token, when the window does not hold it all."""
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    if start is None or not context or offsets[context[0]][0] > start or offsets[context[-1]][1] < end:
        return 0, 0
    first = next(i for i in context if offsets[i][1] > start)
    last = next(i for i in reversed(context) if offsets[i][0] < end)
    return first, last


def encode_windows(tokenizer: Any, questions: list[str], contexts: list[str], max_length: int) -> Any:
    """Each question with every window of its context (offsets and the window's question index in the encoding)."""
    return tokenizer(questions, contexts, truncation="only_second", max_length=max_length, stride=window_stride(tokenizer, questions, max_length),
                     return_overflowing_tokens=True, return_offsets_mapping=True)


def context_offsets(encoded: Any, window: int) -> list[list[int]]:
    """Character offsets of a window's tokens in the context; (-1, -1) outside it."""
    ids = encoded.sequence_ids(window)
    return [list(o) if ids[i] == 1 else [-1, -1] for i, o in enumerate(encoded["offset_mapping"][window])]


class SpanKind(TaskKind):
    name = "span"
    auto_class = "AutoModelForQuestionAnswering"
    outputs = {"start_logits": {0: "batch", 1: "sequence"}, "end_logits": {0: "batch", 1: "sequence"}}
    targets = ("start_positions", "end_positions")
    summary = "extractive question answering (SQuAD-format JSON), windows over long contexts; score: SQuAD F1"

    def read_rows(self, spec: Any, path: Any, layout: Any) -> Rows:
        return read_squad(Path(path))

    def raw_features(self, spec: Any) -> Any:
        from datasets import Features, Sequence, Value

        return Features({"question": Value("string"), "context": Value("string"),
                         "answer_texts": Sequence(Value("string")), "answer_starts": Sequence(Value("int64"))})

    def encode(self, dataset: Any, spec: Any, tokenizer: Any, max_length: int, split: str) -> Any:
        def encode(batch: dict[str, list]) -> dict[str, list]:
            encoded = encode_windows(tokenizer, batch["question"], batch["context"], max_length)
            out: dict[str, list] = {k: encoded[k] for k in MODEL_KEYS[:3] if k in encoded}
            out.update(start_positions=[], end_positions=[], offsets=[], example=[], context=[], answers=[])
            for window, row in enumerate(encoded["overflow_to_sample_mapping"]):
                texts, starts = batch["answer_texts"][row], batch["answer_starts"][row]
                start = starts[0] if starts else None
                end = start + len(texts[0]) if starts else 0
                first, last = _positions(encoded["offset_mapping"][window], encoded.sequence_ids(window), start, end)
                out["start_positions"].append(first)
                out["end_positions"].append(last)
                out["offsets"].append(context_offsets(encoded, window))
                out["example"].append(batch["_index"][row])
                out["context"].append(batch["context"][row])
                out["answers"].append(texts)
            return out

        indexed = dataset.add_column("_index", list(range(len(dataset))))
        return indexed.map(encode, batched=True, remove_columns=indexed.column_names, desc=f"tokenize {split}")

    def collator(self, tokenizer: Any) -> Any:
        from transformers import DataCollatorWithPadding

        pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        return lambda features: pad([{k: f[k] for k in MODEL_KEYS if k in f} for f in features])

    def custom_task(self, custom: Any) -> Any:
        def layout(path: str) -> SplitFile:
            return SplitFile(str(path), ("question", "context"), "answers", format="squad")

        files, share = custom_files(custom.train_file, custom.eval_file, custom.eval_share, layout)
        return TaskSpec("custom", ("question", "context"), None, ("exact_match", "f1"), ("validation",), files, kind=self.name,
                        eval_from_train=share)

    def label_names(self, spec: Any) -> None:
        return None

    def distill_logits(self, outputs: Any) -> torch.Tensor:
        return torch.stack((outputs.start_logits, outputs.end_logits), dim=1)  # (batch, 2, length): two distributions

    def misclassified(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Windows whose most likely start or end is not the answer's."""
        with torch.no_grad():
            out = model(**{k: v for k, v in batch.items() if k not in self.targets})
        wrong = (out.start_logits.argmax(-1) != batch["start_positions"]) | (out.end_logits.argmax(-1) != batch["end_positions"])
        return wrong.nonzero().flatten()

    def metrics(self, spec: Any, outputs: Mapping[str, torch.Tensor], dataset: Any) -> dict[str, float]:
        windows: dict[int, list] = collections.defaultdict(list)
        for i, (example, offsets) in enumerate(zip(dataset["example"], dataset["offsets"])):
            windows[example].append((i, offsets))
        contexts, answers = dataset["context"], dataset["answers"]
        exact = f1 = 0.0
        for example, parts in windows.items():
            found = best_span([(outputs["start_logits"][i], outputs["end_logits"][i], offsets) for i, offsets in parts])
            first = parts[0][0]
            prediction = "" if found is None else contexts[first][found[1]:found[2]]
            em, f = answer_scores(prediction, answers[first])
            exact, f1 = exact + em, f1 + f
        count = max(len(windows), 1)
        return {"exact_match": exact / count, "f1": f1 / count, "score": f1 / count}

    def baseline(self, spec: Any, dataset: Any) -> float:
        """The empty answer to every question: right only where a question has no answer."""
        answers = {example: texts for example, texts in zip(dataset["example"], dataset["answers"])}
        return sum(answer_scores("", texts)[1] for texts in answers.values()) / max(len(answers), 1)

    def serving_schema(self, spec: Any) -> tuple[list, list, dict]:
        inputs = [("string", "question"), ("string", "context")]
        outputs = [("string", "answer"), ("long", "start"), ("long", "end"), ("double", "score")]
        example = {"question": ["Where did John fly?"], "context": ["John Smith flew to Paris with Air France."]}
        return inputs, outputs, example

    def text_columns(self, frame: Any, pair: bool) -> list[str]:
        return ["question", "context"]

    def serve(self, model: nn.Module, tokenizer: Any, frame: Any, max_length: int, batch_size: int, pair: bool) -> Rows:
        """`answer` (text), its character span `start`, `end` in the context, and `score` (its probability in its window)."""
        missing = [c for c in ("question", "context") if c not in frame.columns]
        if missing:
            raise ValueError(f"input needs the column(s) {missing}; got {list(frame.columns)}")
        questions, contexts = frame["question"].astype(str).tolist(), frame["context"].astype(str).tolist()
        encoded = encode_windows(tokenizer, questions, contexts, max_length)
        owner = encoded["overflow_to_sample_mapping"]
        windows: dict[int, list] = collections.defaultdict(list)
        for first in range(0, len(owner), batch_size):
            batch = tokenizer.pad({k: encoded[k][first:first + batch_size] for k in MODEL_KEYS[:3] if k in encoded}, return_tensors="pt")
            with torch.inference_mode():
                out = model(**batch)
            for j in range(batch["input_ids"].shape[0]):
                window = first + j
                windows[owner[window]].append((out.start_logits[j], out.end_logits[j], context_offsets(encoded, window)))
        rows: Rows = []
        for row, context in enumerate(contexts):
            found = best_span(windows[row])
            if found is None:
                rows.append({"answer": "", "start": 0, "end": 0, "score": 0.0})
            else:
                rows.append({"answer": context[found[1]:found[2]], "start": found[1], "end": found[2], "score": float(torch.tensor(found[0]).exp())})
        return rows


SPAN = register_kind(SpanKind())
