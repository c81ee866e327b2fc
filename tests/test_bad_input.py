"""Bad input, as a user makes it: one line naming the key or file, exit code 2, nothing written, no long work.

Each row is run through `lowrank check` and `lowrank run` in-process (the
command line's own code, without a subprocess's imports); `run` must fail in
validation, before Prefect's server starts or a model loads: either would be
recorded, and stopped, by `long_work`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import GLUE_DIR, save_tiny_model, tiny_params
from flows.cli import app


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def long_work(monkeypatch) -> list[str]:
    """What validation must come before, recorded if reached (and stopped there): loading a model, starting Prefect."""
    from transformers import PreTrainedModel

    from flows import runners

    reached: list[str] = []

    def stop(what: str):
        def reach(*args, **kwargs):
            reached.append(what)
            raise RuntimeError(f"{what} on bad input")
        return reach

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(stop("a model loaded")))
    monkeypatch.setattr(runners, "shared_api", stop("Prefect's server started"))
    return reached


def _glue_copy(root: Path, task: str, split_file: str, edit) -> Path:
    """A GLUE folder holding one task whose `split_file` went through `edit(bytes) -> bytes`."""
    folder = {"sst2": "SST-2", "mrpc": "MRPC"}[task]
    target = root / "glue" / folder
    target.mkdir(parents=True)
    for file in (GLUE_DIR / folder).glob("*.tsv"):
        data = file.read_bytes()
        (target / file.name).write_bytes(edit(data) if file.name == split_file else data)
    return root / "glue"


def _truncate_weights(model: Path, root: Path) -> Path:
    import shutil

    copy = root / "model"
    shutil.copytree(model, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return copy


def _sst2_bad_byte(data: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[3] = lines[3].replace(b"a", b"\xff", 1)
    return b"\n".join(lines)


def _sst2_bad_label(data: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[5] = lines[5].rsplit(b"\t", 1)[0] + b"\tpositive"
    return b"\n".join(lines)


def _sst2_short_row(data: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[7] = lines[7].split(b"\t")[0]
    return b"\n".join(lines)


CUSTOM = ["data.task=custom", "data.custom={train_file: ok.csv, eval_file: ok.csv, text_a: s, label: l, label_names: ['0', '1']}"]
FILES = {"ok.csv": "s,l\ngood,1\nbad,0\n"}
# Nine aliases of nine aliases ... of a list: 9 KB that stands for billions of values ("billion laughs").
BOMB = "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))

# (id, what to change, the text the one line must hold)
ROWS = [
    ("unknown solver", {"set": ["factorize.method=tfwsvd", "factorize.solver=foo"]},
     "factorize.solver: unknown solver 'foo' (known: als, adam_sgd)"),
    ("unknown method", {"set": ["factorize.method=nope"]}, "factorize.method: unknown method 'nope'"),
    ("solver option", {"set": ["factorize.solver_options={lamda: 1}"]}, "factorize.solver_options.lamda"),
    ("threads 0", {"set": ["evaluate.threads=0"]}, "evaluate.threads"),
    ("bad regex", {"set": ["factorize.targets=(query"]}, "factorize.targets: not a regular expression"),
    ("unknown key", {"set": ["finetune.lrr=1"]}, "unknown key finetune.lrr"),
    ("bad override", {"set": ["finetune.lr"]}, "override 'finetune.lr' is not of the form key=value"),
    ("wrong type", {"set": ["finetune.epochs=three"]}, "finetune.epochs: expected a number"),
    ("sparse method on factorize path", {"set": ["factorize.method=sparse_svd"]}, "factorize.method"),
    ("unwritable artifacts", {"set": ["paths.artifacts=/proc/x"]}, "paths.artifacts: cannot write in /proc/x"),
    ("missing model", {"model": "missing"}, "model.name: model path does not exist"),
    ("truncated weights", {"model": "truncated"}, "model.safetensors: not a readable safetensors file"),
    ("no GLUE folder, hub offline", {"glue": None}, "set GLUE_DIR or data.glue_dir"),
    ("GLUE folder missing", {"glue": "missing"}, "data.glue_dir: GLUE folder not found"),
    ("non-UTF-8 byte", {"edit": ("train.tsv", _sst2_bad_byte)}, "train.tsv:4: not UTF-8 (byte 0xff"),
    ("label outside the task's", {"edit": ("train.tsv", _sst2_bad_label)}, "train.tsv:6: label 'positive' is not one of"),
    ("row with a missing column", {"edit": ("dev.tsv", _sst2_short_row)}, "dev.tsv:8: expected 2 columns, found 1"),
    ("bad device", {"env": {"LOWRANK_DEVICE": "gpu"}}, "LOWRANK_DEVICE='gpu' is not a torch device"),
    ("tracking server down", {"set": ["tracking.uri=http://127.0.0.1:9"]}, "tracking.uri: http://127.0.0.1:9 does not answer"),
    ("tracking database down", {"set": ["tracking.uri=postgresql://u@127.0.0.1:9/x"]}, "tracking.uri: postgresql://u@127.0.0.1:9/x does not answer"),
    ("select metric not evaluated", {"set": ["sweep.select.metric=accuracy"]}, "sweep.select.metric: accuracy is not a metric of the evaluate stage"),
    ("targets matching no layer", {"set": ["factorize.targets=[no.such.layer]"]}, "factorize.targets: ['no.such.layer'] (less factorize.exclude) matches no Linear layer"),
    ("catastrophic target regex", {"set": ["factorize.targets=(a+)+b"]}, "factorize.targets: '(a+)+b' has a repetition inside a repetition"),
    ("model name too long", {"set": [f"model.name=/tmp/{'a' * 300}"]}, "model.name: /tmp/aaa"),
    ("data file a device", {"set": [*CUSTOM, "data.custom.train_file=zero.csv"], "files": {"zero.csv": None}}, "split train: zero.csv is not a regular file"),
    ("CSV field over the limit", {"set": [*CUSTOM, "data.custom.train_file=long.csv"], "files": {"long.csv": f"s,l\nok,1\n{'x' * 131073},0\n"}},
     "long.csv:3: field larger than field limit (131072)"),
    ("YAML alias bomb", {"params": "bomb"}, "its aliases expand to more than 100,000 values"),
    ("tracking database where nothing can be written", {"set": ["tracking.uri=sqlite:////proc/x/mlflow.db"]}, "tracking.uri: cannot write in /proc/x"),
    ("params file missing", {"params": "missing"}, "params file not found"),
    ("params not YAML", {"params": "broken"}, "not valid YAML"),
]


def _case(tmp_path: Path, model_dir: Path, change: dict, monkeypatch) -> tuple[Path, list[str]]:
    """The params file of one row, and its -S overrides."""
    model = {"missing": tmp_path / "no-such-model", "truncated": None}.get(change.get("model"), model_dir)
    if change.get("model") == "truncated":
        model = _truncate_weights(model_dir, tmp_path)
    glue = GLUE_DIR
    if "glue" in change:
        glue = tmp_path / "no-glue" if change["glue"] == "missing" else None
    if "edit" in change:
        glue = _glue_copy(tmp_path, "sst2", *change["edit"])
    params = tiny_params(tmp_path, model, glue or tmp_path)
    if "glue" in change and change["glue"] is None:
        raw = yaml.safe_load(params.read_text())
        raw["data"]["glue_dir"] = None
        params.write_text(yaml.safe_dump(raw))
        monkeypatch.delenv("GLUE_DIR", raising=False)
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for name, text in {**FILES, **change.get("files", {})}.items() if "files" in change else ():
        if text is None:
            (tmp_path / name).symlink_to("/dev/zero")
        else:
            (tmp_path / name).write_text(text)
    if change.get("params") == "bomb":
        params.write_text("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + BOMB + params.read_text())
    if change.get("params") == "missing":
        params = tmp_path / "nope.yaml"
    elif change.get("params") == "broken":
        params.write_text("data: [unclosed\n")
    for key, value in change.get("env", {}).items():
        monkeypatch.setenv(key, value)
    return params, list(change.get("set", []))


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(("change", "expected"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_with_exit_2(
    tmp_path: Path, model_dir: Path, long_work: list[str], monkeypatch, command: str, change: dict, expected: str
) -> None:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOWRANK_DEBUG", raising=False)
    params, overrides = _case(tmp_path, model_dir, change, monkeypatch)
    result = CliRunner().invoke(app, [command, "--params", str(params), *[a for o in overrides for a in ("-S", o)]])
    assert long_work == []
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert result.stdout == ""
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "metrics").exists()


def test_a_good_input_reaches_the_work_the_rows_stop_before(tmp_path: Path, model_dir: Path, long_work: list[str], monkeypatch) -> None:
    """The rows' `long_work == []` means something: a valid params file gets past validation to Prefect's server."""
    from flows import lifecycle

    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(lifecycle.OWNER_ENV, "")  # `run` claims ownership in this process's environment: undone after
    monkeypatch.setattr(lifecycle, "stop_orphans", lambda: [])  # other runs' servers on the machine are not ours
    params = tiny_params(tmp_path, model_dir, GLUE_DIR, tracking={"enabled": False})  # (MLflow's database: seconds to make)
    result = CliRunner().invoke(app, ["run", "--params", str(params)])
    assert long_work == ["Prefect's server started"] and result.exit_code != 0
    assert not (tmp_path / "artifacts").exists()


def test_debug_shows_the_traceback(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOWRANK_DEBUG", "")  # `--debug` sets it in this process: gone again after the test
    params = tiny_params(tmp_path, model_dir, GLUE_DIR)
    result = CliRunner().invoke(app, ["--debug", "check", "--params", str(params), "-S", "evaluate.threads=0"])
    assert result.exit_code != 0
    assert "ConfigError" in repr(result.exception) or "Traceback" in result.output
