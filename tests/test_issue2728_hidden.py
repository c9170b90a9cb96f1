"""Issues 27/28 as a new user reads them: the documented calls take what a user passes, and bad input is one line.

``finetune_sdk.benchmark`` takes one task name or task file as a string (and a task's YAML path among ``tasks``, as
lm-eval's ``--tasks`` does) instead of splitting it into characters; a batch size that is not a whole number >= 1
or auto is one line (Python) and exit 2 (CLI); ``advise(..., eval_data=...)`` refuses a budget or a number of
shots it can't use before the model loads; ``finetune-lm-eval`` with an unknown ``ref`` is one line and exit 2; the
studio's missing query parameter is a one-line ``{"error": ...}`` like every other refusal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_benchmark import ROWS, write_task  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from finetune_sdk.testing.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("hidden2728")
    save_tiny_model(root / "base")
    return root


def test_task_inputs_take_one_string_comma_names_and_yaml_paths():
    from finetune_sdk.evaluation.benchmarking import task_inputs

    assert task_inputs("arith_choice", ()) == (["arith_choice"], [])
    assert task_inputs("a, b", "t.yaml") == (["a", "b"], [Path("t.yaml")])
    assert task_inputs(["x/my_task.yaml", "c"], [Path("u.yml")]) == (["c"], [Path("u.yml"), Path("x/my_task.yaml")])


@pytest.mark.slow
def test_benchmark_with_one_task_string_scores_that_task(tiny, tmp_path):
    """tasks="arith_choice" is one task (it was split into 'a', 'r', ...), task_files="x.yaml" one file."""
    pytest.importorskip("lm_eval")
    import finetune_sdk

    task = write_task(tmp_path / "tasks")
    common = dict(limit=2, batch_size=2, with_base=False, store=False)
    by_name = finetune_sdk.benchmark(tiny / "base", tasks="arith_choice", task_files=str(task), **common)
    by_path = finetune_sdk.benchmark(tiny / "base", tasks=[str(task)], **common)
    assert [(r["task"], r["metric"]) for r in by_name.table()] == [("arith_choice", "acc")]
    assert by_path.scores[0]["value"] == by_name.scores[0]["value"]
    assert by_path.scores[0]["limit"] == 2


@pytest.mark.parametrize("size", [0, -3, "zero", 2.5, True])
def test_bad_batch_size_is_one_line_before_any_model_loads(size, tmp_path):
    pytest.importorskip("lm_eval")
    import finetune_sdk
    from finetune_sdk.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^batch_size is .*give a whole number of at least 1, or 'auto'"):
        finetune_sdk.benchmark(tmp_path / "no-model", task_files=[write_task(tmp_path)], batch_size=size)


def test_cli_bench_batch_size_zero_exits_2_with_one_line(tmp_path):
    pytest.importorskip("lm_eval")
    from click.testing import CliRunner

    from finetune_sdk.cli.main import cli

    task = write_task(tmp_path)
    for size in ("0", "zero"):
        result = CliRunner().invoke(cli, ["bench", str(tmp_path / "m"), "--task-file", str(task), "--batch-size", size])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert f"'{size}': give a whole number of at least 1, or auto" in result.output


@pytest.mark.parametrize("options, message", [({"eval_budget_s": -1}, "eval_budget_s is -1"),
                                              ({"eval_budget_s": 0}, "eval_budget_s is 0"),
                                              ({"shots": 0}, "shots is 0"), ({"shots": 1.5}, "shots is 1.5")])
def test_advise_refuses_a_budget_or_shots_it_cannot_use_before_the_model_loads(tiny, monkeypatch, options, message):
    import finetune_sdk
    from finetune_sdk.models import loading
    from finetune_sdk.errors import ConfigError

    monkeypatch.setattr(loading, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    held_out = [{"prompt": r["prompt"], "completion": r["completion"]} for r in ROWS[:3]]
    with pytest.raises(ConfigError, match=f"^{message}"):
        finetune_sdk.advise(str(tiny / "base"), eval_data=held_out, **options)


@pytest.mark.slow
def test_finetune_lm_eval_unknown_ref_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from finetune_sdk.evaluation.lm_eval_backend import main

    task = write_task(tmp_path / "tasks")
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.chdir(task.parent)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", "finetune-sdk", "--model_args", "ref=nosuch@9", "--tasks", "arith_choice",
              "--include_path", ".", "--limit", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("Error: ")
    assert "nosuch" in err.strip().splitlines()[-1]


def test_studio_missing_query_parameter_is_one_line_error(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from finetune_sdk.studio.app import create_app

    token = "test-token-0123456789"
    client = TestClient(create_app(tmp_path / "runs", tmp_path, token=token, registry_home=tmp_path / "registry"),
                        base_url="http://127.0.0.1:8765")
    assert client.get("/api/compare/plot.svg").status_code == 401  # the token comes first
    response = client.get("/api/compare/plot.svg", headers={"X-Studio-Token": token})
    assert response.status_code == 400
    assert response.json() == {"error": "dir: field required; see docs/studio.md for the endpoint's parameters"}
    assert json.dumps(response.json()).count("\\n") == 0


def test_score_table_given_a_version_names_the_adapter_to_give(tmp_path, monkeypatch):
    """`finetune registry scores quill@2` (and Registry.score_table("quill@2")) is one line saying to give the name."""
    from click.testing import CliRunner

    from finetune_sdk.cli.main import cli
    from finetune_sdk.errors import RegistryError
    from finetune_sdk.registry import Registry

    with pytest.raises(RegistryError, match=r"^'quill@2' is a version; .*give its name \('quill'"):
        Registry(tmp_path / "registry").score_table("quill@2")
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(tmp_path / "registry"))
    result = CliRunner().invoke(cli, ["registry", "scores", "quill@2"])
    assert result.exit_code == 2 and "finetune registry scores quill" in result.output
    assert "Traceback" not in result.output


TOKEN = "test-token-0123456789"
H = {"X-Studio-Token": TOKEN}


@pytest.fixture(scope="module")
def published(tiny):
    """A tiny LoRA result (2 steps) published as bot@1 in a registry of its own."""
    from finetune_sdk import Trainer
    from finetune_sdk.registry import Registry

    result = Trainer(str(tiny / "base"), formatter="chatml", output_dir=tiny / "out", max_steps=2, progress=False,
                     seed=0).fit(ROWS[:4])
    Registry(tiny / "registry").publish(result, "bot")
    return tiny


def _chat(client, body):
    response = client.post("/api/chat", headers=H, json=body)
    assert response.status_code == 200, response.text
    return [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: ")]


@pytest.fixture
def studio(published, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from finetune_sdk.studio.app import create_app

    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(published / "another-registry"))  # restored after the test
    app = create_app(published / "runs", published, token=TOKEN, registry_home=published / "registry")
    return TestClient(app, base_url="http://127.0.0.1:8765")


@pytest.mark.slow
def test_chat_opens_a_version_from_the_registry_the_studio_shows(studio, published):
    """create_app(registry_home=...) lists bot@1 in /api/models, so the chat must open it from there too (it looked
    in FINETUNE_SDK_REGISTRY / the default home: "no adapter named 'bot'"); the rating records its version."""
    assert [v["ref"] for v in studio.get("/api/models", headers=H).json()["versions"]] == ["bot@1"]
    events = _chat(studio, {"models": [str(published / "base"), "bot@1"], "prompt": "what is 1 plus 2?",
                            "settings": {"max_new_tokens": 3, "seed": 1}})
    assert [e for e in events if e["event"] == "error"] == []
    done = [e for e in events if e["event"] == "done"]
    assert [d["column"] for d in done] == [0, 1]
    out = published / "pairs-hidden.jsonl"
    rated = studio.post("/api/rate", headers=H, json={"kind": "pair", "answers": [done[0]["id"], done[1]["id"]],
                                                      "value": "B", "out": out.name})
    assert rated.status_code == 200, rated.text
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["chosen"] == done[1]["answer"] and row["rejected"] == done[0]["answer"]
    assert row["model"]["version"] == "bot@1" and len(row["model"]["manifest_sha256"]) == 64


@pytest.mark.slow
@pytest.mark.parametrize("kind, value, message", [
    ("pair", "A is better", "a pair rating's value is 0 or 'a' (A is better), 1 or 'b' (B is better), 'tie' or "
                            "'both_bad'; got 'A is better'"),
    ("pair", 2, "a pair rating's value is 0 or 'a'"), ("pair", True, "a pair rating's value is 0 or 'a'"),
    ("edit", "  ", "an edit needs the better answer's text (not empty) as its value")])
def test_a_rating_value_the_page_cannot_send_is_one_line_in_the_api_s_words(studio, published, kind, value, message):
    """Not the terminal's "ask returned ... Edited(text), 'skip' or 'quit'"; nothing is written."""
    events = _chat(studio, {"models": [str(published / "base")] * 2, "prompt": "hi",
                            "settings": {"max_new_tokens": 2}})
    ids = [e["id"] for e in events if e["event"] == "done"]
    out = published / f"refused-{kind}.jsonl"
    response = studio.post("/api/rate", headers=H, json={"kind": kind, "answers": ids[: 2 if kind == "pair" else 1],
                                                         "value": value, "out": out.name})
    assert response.status_code == 400 and response.json()["error"].startswith(message)
    assert "ask returned" not in response.json()["error"] and not out.exists()


def test_pair_values_accepted_as_the_page_labels_them():
    from finetune_sdk.studio.rating import pair_value

    assert [pair_value(v) for v in (0, 1, "a", "B", "tie", "both_bad", "Both bad", "both-bad")] == \
        [0, 1, 0, 1, "tie", "both_bad", "both_bad", "both_bad"]


def test_an_unknown_sampling_setting_is_refused_not_ignored():
    from finetune_sdk.errors import ConfigError
    from finetune_sdk.studio.chat import Settings

    assert Settings.from_body({"settings": {"temperature": 0.5}}).temperature == 0.5
    with pytest.raises(ConfigError, match=r"^unknown sampling setting 'temprature'; the chat's settings are "
                                          r"max_new_tokens, temperature and seed"):
        Settings.from_body({"settings": {"temprature": 0.5}})


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5])
def test_bench_seed_numpy_cannot_take_is_one_line_before_any_model_loads(seed, tmp_path):
    """`finetune bench --seed -1` was a NumPy traceback (exit 1) after the model had loaded."""
    pytest.importorskip("lm_eval")
    from click.testing import CliRunner

    import finetune_sdk
    from finetune_sdk.cli.main import cli
    from finetune_sdk.errors import ConfigError

    task = write_task(tmp_path)
    with pytest.raises(ConfigError, match=r"^seed is .*; give a whole number from 0 to 2\*\*32 - 1"):
        finetune_sdk.benchmark(tmp_path / "no-model", task_files=[task], seed=seed)
    if isinstance(seed, int):
        result = CliRunner().invoke(cli, ["bench", str(tmp_path / "no-model"), "--task-file", str(task),
                                          "--seed", str(seed)])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert f"seed is {seed}; give a whole number from 0 to 2**32 - 1" in result.output


def test_advise_data_without_eval_is_refused_not_ignored(tiny, tmp_path):
    """`finetune advise M --data train.jsonl` (no --eval) printed advice that never read the file."""
    from click.testing import CliRunner

    import finetune_sdk
    from finetune_sdk.cli.main import cli
    from finetune_sdk.errors import ConfigError

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(ConfigError, match=r"^data \(--data\) is read with eval_data \(--eval HELD_OUT.jsonl\)"):
        finetune_sdk.advise(str(tiny / "base"), data=str(train))
    result = CliRunner().invoke(cli, ["advise", str(tiny / "base"), "--data", str(train)])
    assert result.exit_code == 2 and "Traceback" not in result.output and "--rows" in result.output


def test_scores_table_keeps_every_figure_whole_in_an_80_column_terminal(tmp_path, monkeypatch):
    """`finetune registry scores` (and `finetune bench`) in 80 columns cut values to '0.5…' and '+0.00…' and the
    task name to 'arith_…'; the figures now keep their width and a long task name folds."""
    from click.testing import CliRunner

    from finetune_sdk.cli import render
    from finetune_sdk.cli.main import cli
    from finetune_sdk.registry import Registry

    registry = Registry(tmp_path / "registry")
    rows = [{"task": "quillfeather_choice_long_name", "metric": "acc_norm", "filter": "none", "num_fewshot": 5,
             "limit": None, "model": model, "value": value, "stderr": 0.1118, "vs_base": vs_base,
             "significant": significant}
            for model, value, vs_base, significant in (("base", 0.1875, None, None),
                                                       ("quill@12", 0.75, 0.5625, True))]
    monkeypatch.setattr(Registry, "score_table", lambda self, name: rows)
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(registry.home))
    monkeypatch.setenv("COLUMNS", "80")
    render.console.cache_clear()
    try:
        out = CliRunner().invoke(cli, ["registry", "scores", "quill"]).output
    finally:
        render.console.cache_clear()
    assert "…" not in out, out
    for figure in ("0.1875", "0.7500", "0.1118", "+0.5625", "quill@12", "yes"):
        assert figure in out, out
    assert max(len(line) for line in out.splitlines()) <= 80


def _thumbs_file(folder, labels):
    path = folder / "one-way.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}", "label": label}) + "\n"
                            for i, label in enumerate(labels)))
    return path


def test_retrain_plan_refuses_thumbs_all_one_way_as_the_kto_trainer_does(tmp_path):
    """The plan said "warning" and Retrain started a run that died at once with KTO's "every row has label true"."""
    from finetune_sdk.studio.retrain import plan

    refused = plan(_thumbs_file(tmp_path, [True] * 5), "kto")
    assert refused["counts"] == {"rows": 5, "desirable": 5, "undesirable": 0}
    assert refused["error"] == ("all 5 ratings are thumbs up: KTO needs both desirable and undesirable answers; "
                                "rate some answers the other way")
    assert plan(_thumbs_file(tmp_path, [False, False]), "kto")["error"].startswith("all 2 ratings are thumbs down")
    assert plan(_thumbs_file(tmp_path, [True, False]), "kto")["error"] is None


@pytest.mark.slow
def test_retrain_confines_path_options_as_the_run_form_does(studio, published):
    """options={"deepspeed": "/etc/passwd"} started a run from /api/retrain; the form refused the same path."""
    thumbs = _thumbs_file(published, [True, False, True, False])
    for key in ("deepspeed", "fsdp_config", "reward_model"):
        response = studio.post("/api/retrain", headers=H, json={
            "objective": "kto", "file": thumbs.name, "rated": "bot@1", "options": {key: "/etc/passwd"}})
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith("/etc/passwd is outside the folders the studio may read")
    assert not (published / "runs").exists() or not any((published / "runs").iterdir())


@pytest.mark.parametrize("arguments, message", [
    ({"chat": "maybe"}, "model argument chat='maybe' is not true or false; give chat=true or chat=false"),
    ({"check": "maybe"}, "model argument check='maybe' is not true or false"),
    ({"bse": "true"}, "unknown model argument 'bse' of the finetune-sdk backend; give ref, base, chat, check"),
])
def test_lm_eval_model_arguments_are_checked_before_the_model_loads(arguments, message, monkeypatch):
    """`--model_args ref=bot@2,chat=maybe` failed only after the model had loaded, and a misspelt `bse=true` was
    swallowed by HFLM's **kwargs (the result scored instead of its base)."""
    pytest.importorskip("lm_eval")
    from finetune_sdk.evaluation import lm_eval_backend as eval_backend
    from finetune_sdk.errors import ConfigError

    monkeypatch.setattr(eval_backend, "open_for_lm_eval", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=f"^{message}".replace("(", r"\(").replace(")", r"\)")):
        eval_backend.FinetuneSDKLM(ref="bot@2", **arguments)
