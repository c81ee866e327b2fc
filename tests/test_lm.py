"""The `lm` kind on a tiny Llama built in code: perplexity against known answers, its readers, goal min in every
choice, greedy generation through compression, serving, and the factorize path end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from lowrank.config import InputError
from lowrank.kinds import better, get_kind

WORDS = "the a cat dog sat ran on under mat rug big small red blue and slept".split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
DOCUMENTS = [
    "the cat sat on the mat", "a dog ran under the rug", "the big cat slept on a red mat",
    "a small dog sat under the blue rug", "the cat and the dog slept", "a red cat ran on the big rug",
]


def save_tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama (grouped-query attention, gated FFN) with a word-level tokenizer, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text(path: Path, documents=DOCUMENTS, repeat: int = 1) -> Path:
    path.write_text("\n".join(documents * repeat) + "\n")
    return path


def _custom(train: Path, dev: Path, text_a: str | None = None):
    from lowrank.config.sections import CustomDataConfig

    return CustomDataConfig(train_file=str(train), eval_file=str(dev), kind="lm", text_a=text_a)


# ---------------------------------------------------------------------------------------------------- scoring


def test_perplexity_of_known_logits_over_real_tokens_only() -> None:
    kind = get_kind("lm")
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log().expand(2, 4, 4).clone()  # (B, T, V): the same distribution at every position
    labels = torch.tensor([[0, 1, 2, 3], [0, 0, -100, -100]])  # row 2: one real next token, then padding
    logits[1, 2:] = torch.randn(2, 4) * 50  # garbage where the padding is: never read
    # predicted: row 1 tokens 1, 2, 3 (p .25, .125, .125); row 2 token 0 (p .5)
    nll = -(math.log(0.25) + 2 * math.log(0.125) + math.log(0.5)) / 4
    metrics = kind.metrics(None, {"logits": logits, "labels": labels}, None)
    assert metrics["nll"] == pytest.approx(nll) and metrics["score"] == metrics["perplexity"] == pytest.approx(math.exp(nll))
    uniform = kind.metrics(None, {"logits": torch.zeros(1, 5, 7), "labels": torch.tensor([[1, 2, 3, 4, 5]])}, None)
    assert uniform["perplexity"] == pytest.approx(7.0)  # a uniform model's perplexity is the vocabulary's size
    assert kind.goal == "min" and kind.baseline(None, None) is None


def test_better_honours_the_goal() -> None:
    assert better(3.0, 5.0, "min") and not better(5.0, 3.0, "min") and better(5.0, 3.0) and better(1.0, None, "min")
    assert not better(3.0, 3.0, "min")  # a tie beats nothing
    with pytest.raises(ValueError, match="goal"):
        better(1.0, 2.0, "lowest")


def test_keep_best_ends_on_the_lowest_perplexity_and_the_start_guard_too() -> None:
    from test_training import CFG, _run, _same

    final, snapshots, result = _run(CFG, [9.0, 4.0, 6.0], goal="min")
    assert (result.best_epoch, result.best_score) == (2, 4.0) and _same(final, snapshots[1])
    final, snapshots, result = _run(CFG, [5.0, 6.0, 7.0, 8.0], score_start=True, goal="min")  # + ft only made it worse
    assert (result.best_epoch, result.best_score) == (0, 5.0) and _same(final, snapshots[0])


def test_pareto_score_kept_and_the_champion_honour_goal_min() -> None:
    from types import SimpleNamespace

    from lowrank.config.sweep_spec import SelectConfig
    from lowrank.pipeline.factorize import collapse_report
    from lowrank.pipeline.summary import pareto, score_kept
    from tasks.models import choose

    # (perplexity, params kept): (12, .5) is beaten by (10, .5); (20, .2) is the cheapest
    assert pareto([(10.0, 0.5), (12.0, 0.5), (20.0, 0.2), (25.0, 0.3)], "min") == [True, False, True, False]
    assert score_kept(20.0, 10.0, "min") == 0.5 and score_kept(0.45, 0.9) == 0.5
    assert collapse_report([{"epoch": 0, "score": 30.0}, {"epoch": 1, "score": 30.0}], None)["collapsed"] is False

    def run(keep: float, ppl: float):
        metrics = {"evaluate_compressed.params.target_linear": keep * 1000, "evaluate_compressed.task.score": ppl}
        return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={"path": "factorize", "keep_ratio": str(keep)},
                                                    params={"data.task": "custom", "data.custom.kind": "lm"}))

    runs = [run(0.5, 12.0), run(0.3, 15.0), run(0.7, 11.0)]
    best, reason = choose(SelectConfig(), runs)
    assert best is runs[2] and "(min)" in reason
    assert choose(SelectConfig(max_keep_ratio=0.5), runs)[0] is runs[0]
    assert choose(SelectConfig(goal="max"), runs)[0] is runs[1]  # as configured, whatever the kind


def test_distillation_averages_kl_over_real_tokens_only() -> None:
    from lowrank.train.loop import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    loss = distillation_loss(student, teacher, 2.0, mask)
    moved = student.clone()
    moved[1, 2:] += 100  # padding positions: anything there leaves the loss alone
    assert torch.allclose(distillation_loss(moved, teacher, 2.0, mask), loss)
    kl = [torch.nn.functional.kl_div(student[b, t].div(2).log_softmax(-1), teacher[b, t].div(2).softmax(-1), reduction="sum")
          for b, t in mask.nonzero().tolist()]
    assert torch.allclose(loss, torch.stack(kl).mean() * 4)


# ---------------------------------------------------------------------------------------------------- data


def test_text_and_jsonl_files_are_read_and_a_bad_row_named_by_file_and_line(tmp_path: Path) -> None:
    from lowrank.data.loading import read_split
    from lowrank.data.catalog import DataError

    kind = get_kind("lm")
    text = tmp_path / "train.txt"
    text.write_text("the cat sat\n\n  \na dog ran\n")
    spec = kind.custom_task(_custom(text, text))
    assert read_split(spec, "train") == [{"text": "the cat sat"}, {"text": "a dog ran"}]  # blank lines are no documents

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"body": "the cat sat"}\n{"body": "a dog ran"}\n')
    spec = kind.custom_task(_custom(jsonl, jsonl, text_a="body"))
    assert read_split(spec, "validation") == [{"text": "the cat sat"}, {"text": "a dog ran"}]
    jsonl.write_text('{"body": "the cat sat"}\n\n{"body": 7}\n')
    with pytest.raises(DataError, match=rf"^{jsonl}:3: 'body' should be a non-empty string, got 7$"):
        read_split(spec, "train")
    jsonl.write_text('{"body": "the cat sat"}\n{"body": "a dog\n')
    with pytest.raises(DataError, match=rf"^{jsonl}:2: not valid JSON"):
        read_split(spec, "train")


def test_documents_become_windows_with_padding_masked_out_of_the_labels(tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    kind = get_kind("lm")
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path / "llama"))
    raw = Dataset.from_list([{"text": "the cat sat on the mat"}, {"text": "a dog ran"}, {"text": "cat"}])
    data = kind.encode(raw, None, tokenizer, 4, "train")
    ids = tokenizer(["the cat sat on the mat", "a dog ran"])["input_ids"]
    assert data["input_ids"] == [ids[0][:4], ids[0][4:], ids[1]]  # 6 words in windows of 4, none lost; "cat" predicts nothing
    batch = kind.collator(tokenizer)([data[1], data[2]])
    assert batch["labels"].tolist() == [ids[0][4:] + [-100], ids[1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_activation_statistics_count_real_tokens_only(tmp_path: Path) -> None:
    """ASVD's and SVD-LLM's input statistics of a right-padded batch equal those of its rows one by one, unpadded."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank.modules.matching import find_targets
    from lowrank.train.importance import collect_importance

    kind = get_kind("lm")
    folder = save_tiny_llama(tmp_path / "llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    data = kind.encode(Dataset.from_list([{"text": DOCUMENTS[3]}, {"text": "a dog ran"}]), None, tokenizer, 16, "train")
    names = find_targets(model)[:3]

    def stats(batch_size: int) -> dict:
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=kind.collator(tokenizer))
        return collect_importance(model, loader, names, activations=True, progress=False)

    padded, alone = stats(2), stats(1)
    for key in ("abs_mean", "gram"):
        for name in names:
            assert torch.allclose(padded[key].scores[name], alone[key].scores[name], atol=1e-5), (key, name)


# ---------------------------------------------------------------------------------------------------- models


def test_greedy_generation_is_the_same_after_compression_near_full_rank(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank import compress_, load_compressed, save_compressed
    from lowrank.modules.layers import FactorizedLinear
    from lowrank.modules.matching import find_targets

    folder = save_tiny_llama(tmp_path / "llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    targets = find_targets(model)
    kinds = sorted({name.rsplit(".", 1)[1] for name in targets})
    assert kinds == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"] and len(targets) == 14  # the defaults find them all
    prompt = tokenizer("the cat sat on", return_tensors="pt")["input_ids"]

    def greedy(m) -> list[int]:
        with torch.inference_mode():
            return m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()

    before = greedy(model)
    compress_(model, method="svd", keep_ratio=0.99)
    assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) > 0  # (a rank that saves nothing stays dense)
    assert greedy(model) == before and len(before) == prompt.shape[1] + 8
    save_compressed(model, tmp_path / "compressed", method="svd", tokenizer=tokenizer)
    assert greedy(load_compressed(tmp_path / "compressed").eval()) == before


def test_the_served_lm_returns_generated_text_and_exports_or_says_why(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank.io.export import export_onnx

    kind = get_kind("lm")
    folder = save_tiny_llama(tmp_path / "llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    frame = pd.DataFrame({"prompt": ["the cat sat", "a dog"], "max_new_tokens": [3, 5]})
    rows = kind.serve(model, tokenizer, frame, 16, 8, False)
    assert [len(r["text"].split()) for r in rows] == [3, 5]  # word-level: one word per generated token
    assert all(w in WORDS + SPECIAL for r in rows for w in r["text"].split())
    default = kind.serve(model, tokenizer, pd.DataFrame({"prompt": ["the"]}), 16, 8, False)
    assert default == kind.serve(model, tokenizer, pd.DataFrame({"prompt": ["the"], "max_new_tokens": [32]}), 16, 8, False)
    assert default != kind.serve(model, tokenizer, pd.DataFrame({"prompt": ["the"], "max_new_tokens": [2]}), 16, 8, False)
    inputs, outputs, example = kind.serving_schema(None)
    assert [c[1] for c in inputs] == ["prompt", "max_new_tokens"] and outputs == [("string", "text")] and set(example) == {"prompt", "max_new_tokens"}
    from tasks.models import _signature

    signature, _ = _signature(kind.custom_task(_custom(tmp_path / "t.txt", tmp_path / "d.txt")))
    assert [(c.name, c.required) for c in signature.inputs.inputs] == [("prompt", True), ("max_new_tokens", False)]
    with pytest.raises(ValueError, match="'prompt'"):
        kind.serve(model, tokenizer, pd.DataFrame({"text": ["x"]}), 16, 8, False)
    checked = export_onnx(model, tmp_path / "model.onnx")
    assert checked["max_abs_diff"] < 1e-4
    from datasets import Dataset

    from lowrank.evaluation import predict
    from lowrank.io.export import onnx_session, predict_onnx

    # evaluation keeps each token's NLL, not the logits: the perplexity is exp of the model's own loss over one batch
    data = kind.encode(Dataset.from_list([{"text": t} for t in DOCUMENTS]), None, tokenizer, 16, "validation")
    loader = torch.utils.data.DataLoader(data, batch_size=len(data), collate_fn=kind.collator(tokenizer))
    condensed = predict(model, loader, tuple(kind.outputs), kind.targets, kind.condense)
    assert set(condensed) == {"nll", "labels"}
    with torch.no_grad():
        loss = model(**next(iter(loader))).loss
    assert kind.metrics(None, condensed, data)["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert kind.metrics(None, predict(model, loader), data)["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    onnx = predict_onnx(onnx_session(tmp_path / "model.onnx"), loader, tuple(kind.outputs), kind.targets, kind.condense)
    assert kind.metrics(None, onnx, data)["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)


# ---------------------------------------------------------------------------------------------------- the pipeline


def lm_params(root: Path, model_dir: Path, **sections) -> Path:
    from conftest import tiny_params

    root.mkdir(parents=True, exist_ok=True)
    custom = {"kind": "lm", "train_file": str(write_text(root / "train.txt", repeat=6)), "eval_file": str(write_text(root / "dev.txt"))}
    data = {"task": "custom", "custom": custom, "max_train_samples": None, "max_eval_samples": None, "max_length": 16}
    sections = {"data": data, "evaluate": {"latency": False}, **sections}
    return tiny_params(root, model_dir, root, **sections)


DISTILLED = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "distill": {"enabled": True, "weight": 0.5}}


@pytest.mark.parametrize(("method", "latency"), [("fwsvd", False), ("svd_llm", True)])
def test_the_factorize_path_runs_in_process_on_a_tiny_llama(tmp_path: Path, method: str, latency: bool) -> None:
    from lowrank.config import load_params
    from lowrank.pipeline import get_stage, pipeline, preflight

    sections = {"factorize": {"method": method, "keep_ratio": 0.5}, "finetune_compressed": DISTILLED,
                "finetune": {"epochs": 2, "batch_size": 8, "lr": 3e-3},
                "evaluate": {"latency": latency, "latency_runtimes": ["torch", "onnxruntime"], "latency_batch_sizes": [1, 2],
                             "latency_seq_len": 8, "latency_warmup": 0, "latency_repeats": 1}}
    params = load_params(lm_params(tmp_path, save_tiny_llama(tmp_path / "llama"), **sections))
    preflight(params)
    for name in pipeline(params):
        get_stage(name).run(params)
    metrics = lambda name: json.loads((tmp_path / "metrics" / f"{name}.json").read_text())  # noqa: E731
    vocab = len(SPECIAL + WORDS)
    dense, compressed = metrics("evaluate_dense")["task"], metrics("evaluate_compressed")["task"]
    assert dense["score"] == pytest.approx(dense["perplexity"]) and dense["nll"] == pytest.approx(math.log(dense["perplexity"]))
    assert dense["perplexity"] < vocab  # two epochs on repeated text beat the uniform guess
    finetuned = metrics("finetune")
    assert finetuned["best_score"] == min(row["score"] for row in finetuned["history"])  # keep_best took the lowest
    plus_ft = metrics("finetune_compressed")
    assert plus_ft["collapsed"] is False and plus_ft["history"][0]["epoch"] == 0
    assert ("latency_onnxruntime" in metrics("evaluate_compressed")) == latency  # the exported decoder runs in onnxruntime
    summary = metrics("summary_factorize")
    assert summary["compressed"]["score_kept"] == pytest.approx(dense["score"] / compressed["score"])


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_bad_jsonl_row_or_a_classifier_checkpoint_is_one_line_with_exit_2_before_any_work(tmp_path: Path, monkeypatch, command: str) -> None:
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from test_kinds import save_tiny

    monkeypatch.chdir(tmp_path)
    params = lm_params(tmp_path, save_tiny_llama(tmp_path / "llama"))
    raw = yaml.safe_load(params.read_text())
    (tmp_path / "dev.jsonl").write_text('{"text": "the cat sat"}\n{"txt": "a dog ran"}\n')
    raw["data"]["custom"]["eval_file"] = str(tmp_path / "dev.jsonl")
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, [command, "--params", str(params)])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {tmp_path / 'dev.jsonl'}:2: 'text' should be a non-empty string, got None"
    raw["data"]["custom"]["eval_file"] = str(write_text(tmp_path / "dev.txt"))
    raw["model"] = {"name": str(save_tiny(tmp_path / "classifier", "BertForSequenceClassification")), "finetuned": True}
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, [command, "--params", str(params)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "head BertForSequenceClassification (sequence task kind), the task custom is a lm task (AutoModelForCausalLM)" in result.stderr
    assert not (tmp_path / "artifacts").exists()


def test_fisher_only_misclassified_is_refused_for_an_lm() -> None:
    with pytest.raises(ValueError, match="fisher.only_misclassified"):
        get_kind("lm").misclassified(None, {})


@pytest.mark.slow
def test_lowrank_run_and_sweep_ship_the_lowest_perplexity_as_a_text_generator(tmp_path: Path, prefect_api: str) -> None:
    import subprocess

    import mlflow

    from conftest import LOWRANK, lowrank_env, run_sweep

    lm_params(tmp_path, save_tiny_llama(tmp_path / "llama"), sweep={"grid": {"factorize.keep_ratio": [0.3, 0.9]}})
    env = lowrank_env(PREFECT_API_URL=prefect_api)
    done = subprocess.run([*LOWRANK, "--quiet", "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["evaluate_compressed"]["metrics"]["task.perplexity"] > 1.0
    code, summary, err = run_sweep(tmp_path, env, "--workers", "1", "--threads", "1")
    assert code == 0, err[-2000:]
    champion = summary["champion"]
    assert champion["registered"] and "(min)" in champion["reason"], champion
    table = json.loads((tmp_path / "metrics" / "sweep.json").read_text())["configurations"]
    assert len(table) == 2 and champion["value"] == min(row["score"] for row in table), table
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/lowrank-custom@champion").predict(pd.DataFrame({"prompt": ["the cat"], "max_new_tokens": [4]}))
    assert list(served.columns) == ["text"] and len(served["text"][0].split()) <= 4
