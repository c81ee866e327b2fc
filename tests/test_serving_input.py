"""The served model checks its input: a 400 naming the column and row, a 413 past the limits, never a guess."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.serving import Limits, RequestError, validate_text_rows

LIMITS = Limits(max_rows=4, max_chars=50)


@pytest.mark.parametrize(("frame", "status", "message"), [
    ({"txt": ["a"]}, 400, "column 'text' is missing"),
    ({"text": ["fine", 5]}, 400, "column 'text', row 1: expected a string, got int (5)"),
    ({"text": [1.5]}, 400, "column 'text', row 0: expected a string, got float (1.5)"),
    ({"text": ["ok", ["a", "list"]]}, 400, "column 'text', row 1: expected a string, got list"),
    ({"text": [{"a": 1}]}, 400, "column 'text', row 0: expected a string, got dict"),
    ({"text": [True]}, 400, "column 'text', row 0: expected a string, got bool"),
    ({"text": ["ok", None]}, 400, "column 'text', row 1: expected a string, got null"),
    ({"text": ["ok", float("nan")]}, 400, "column 'text', row 1: expected a string, got null"),
    ({"text": ["x"] * 5}, 413, "5 rows in one request; at most 4 (LOWRANK_SERVE_MAX_ROWS)"),
    ({"text": ["x" * 30, "y" * 21]}, 413, "51 characters in one request; at most 50 (LOWRANK_SERVE_MAX_CHARS)"),
])
def test_bad_requests_are_refused_naming_column_and_row(frame: dict, status: int, message: str) -> None:
    with pytest.raises(RequestError) as err:
        validate_text_rows(pd.DataFrame(frame), ["text"], LIMITS)
    assert err.value.get_http_status_code() == status
    assert message in err.value.message


def test_a_pair_task_checks_both_columns_and_a_good_request_passes() -> None:
    good = pd.DataFrame({"text": ["a", "b"], "text_pair": ["c", "d"]})
    assert validate_text_rows(good, ["text", "text_pair"], LIMITS) == [["a", "b"], ["c", "d"]]
    with pytest.raises(RequestError, match="column 'text_pair', row 0: expected a string, got int"):
        validate_text_rows(pd.DataFrame({"text": ["a"], "text_pair": [3]}), ["text", "text_pair"], LIMITS)


def test_the_limits_come_from_the_server_s_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWRANK_SERVE_MAX_ROWS", "7")
    monkeypatch.setenv("LOWRANK_SERVE_MAX_CHARS", "99")
    assert Limits.from_env() == Limits(7, 99)


def test_mlflow_s_scoring_server_answers_400_and_413(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from lowrank.data.catalog import get_task
    from tasks.models import MODEL_CODE, _signature

    serving = tmp_path / "serving.json"
    serving.write_text(json.dumps({"max_length": 16, "batch_size": 8, "text_pair": False, "method": "dense"}))
    mlflow.pyfunc.save_model(str(tmp_path / "served"), python_model=str(MODEL_CODE), signature=_signature(get_task("sst2"))[0],
                             artifacts={"model": str(tiny_model_dir), "serving": str(serving)})
    monkeypatch.setenv("LOWRANK_SERVE_MAX_ROWS", "3")
    client = TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(tmp_path / "served"))))

    def post(rows: list) -> tuple[int, str]:
        answer = client.post("/invocations", json={"dataframe_split": {"columns": ["text"], "data": [[r] for r in rows]}})
        return answer.status_code, answer.text

    assert post(["a fine film", "dull"])[0] == 200
    for bad, where in ((["fine", 5], "row 1: expected a string, got int"), ([None], "row 0: expected a string, got null"),
                       ([["a", "b"]], "row 0: expected a string, got list")):
        status, text = post(bad)
        assert status == 400 and f"column 'text', {where}" in text, text
    status, text = post(["a", "b", "c", "d"])
    assert status == 413 and "4 rows in one request; at most 3" in text
