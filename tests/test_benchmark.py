"""finetune bench / finetune_sdk.benchmark on lm-evaluation-harness, offline, with local task files.

A tiny Llama is taught sixteen sums; a multiple-choice task over the same questions (the right sum and three wrong
ones) is scored on the trained registry version and on its base: the score rises beyond twice the combined
standard error, the scores are stored with the version and listed, lm-eval's own command line gives the same
numbers, a technique that leaves the adapter off is refused, and a missing dataset is one line.
"""

from __future__ import annotations

import glob
import json
import types
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
        for a in range(4) for b in range(4)]
TASK = """task: arith_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: arith_choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def write_task(folder: Path) -> Path:
    """The multiple-choice task over ROWS: the right sum at a rotating position among three wrong ones."""
    docs = []
    for i, row in enumerate(ROWS):
        a, b = divmod(i, 4)
        wrong = [w for w in (a + b + 1, a + b + 2, a + b + 3, a + b - 1, a + b - 2) if w >= 0][:3]
        choices = [f"{a} plus {b} is {w}." for w in wrong]
        choices.insert(i % 4, row["completion"])
        docs.append({"question": row["prompt"], "choices": choices, "answer": i % 4})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arith_choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "arith_choice.yaml").write_text(TASK)
    return folder / "arith_choice.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA result taught ROWS (60 epochs: ~10 s), published as arith@1 in a fresh registry, and the task."""
    from finetune_sdk import Trainer
    from finetune_sdk.registry import Registry
    from finetune_sdk.testing.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("bench")
    base = save_tiny_model(root / "base")
    result = Trainer(str(base), formatter="chatml", output_dir=root / "out", num_train_epochs=60,
                     learning_rate=3e-2, r=16, progress=False, seed=0).fit(ROWS)
    registry = Registry(root / "registry")
    registry.publish(result, "arith")
    return types.SimpleNamespace(root=root, registry=registry, task=write_task(root / "tasks"),
                                 out=root / "out")


@pytest.mark.slow
def test_trained_version_beats_its_base_beyond_the_standard_error_and_keeps_its_scores(trained, monkeypatch):
    from click.testing import CliRunner

    from finetune_sdk.evaluation.benchmarking import benchmark
    from finetune_sdk.evaluation.opening import weights_sha256
    from finetune_sdk.cli.main import cli

    result = benchmark("arith@1", task_files=[trained.task], batch_size=8, registry=trained.registry)
    [row] = result.table()
    assert row["task"] == "arith_choice" and row["metric"] == "acc"
    assert row["vs_base"] > 2 * (row["stderr"] ** 2 + row["base_stderr"] ** 2) ** 0.5 and row["significant"]
    assert row["value"] >= 0.6 and row["base"] <= 0.4
    [score] = result.scores
    assert score["adapter_sha256"] == weights_sha256(trained.out) and len(score["adapter_sha256"]) == 64
    assert score["task_version"] == 1.0 and score["num_fewshot"] == 0 and score["lm_eval_version"] == "0.4.13"
    assert result.stored_as == "arith@1"

    stored = trained.registry.scores("arith@1")
    assert [(s["task"], s["metric"], s["value"], s["stderr"]) for s in stored] == \
        [("arith_choice", "acc", score["value"], score["stderr"])]
    table = trained.registry.score_table("arith")
    assert [t["model"] for t in table] == ["base", "arith@1"]
    assert table[1]["vs_base"] == pytest.approx(row["vs_base"]) and table[1]["significant"] is True
    assert trained.registry.show("arith@1")["scores"] == stored

    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(trained.registry.home))
    monkeypatch.setenv("COLUMNS", "160")
    listed = CliRunner().invoke(cli, ["registry", "scores", "arith"])
    assert listed.exit_code == 0, listed.output
    assert "arith@1" in listed.output and "base" in listed.output and f"+{row['vs_base']:.4f}" in listed.output
    shown = CliRunner().invoke(cli, ["registry", "show", "arith@1"])
    assert "score arith_choice acc" in shown.output and f"{score['value']:.4f}" in shown.output
    as_json = json.loads(CliRunner().invoke(cli, ["registry", "scores", "arith", "--json"]).output)
    assert as_json == json.loads(json.dumps(table))


@pytest.mark.slow
def test_lm_eval_command_line_gives_the_same_numbers_as_the_sdk(trained, monkeypatch, tmp_path):
    """The stock `lm_eval` command (a subprocess; the installed startup hook registers --model finetune-sdk) and
    `finetune-lm-eval` score the same as finetune_sdk.benchmark, 2-shot in the result's chat format (multi-turn)."""
    import os
    import subprocess
    import sys

    import finetune_sdk
    from finetune_sdk.evaluation.lm_eval_backend import main

    sdk = finetune_sdk.benchmark("arith@1", task_files=[trained.task], num_fewshot=2, batch_size=4,
                                 with_base=False, store=False, registry=trained.registry)
    assert sdk.scores[0]["num_fewshot"] == 2
    args = ["run", "--model", "finetune-sdk", "--model_args", "ref=arith@1", "--tasks", "arith_choice",
            "--include_path", str(trained.task.parent), "--batch_size", "4", "--num_fewshot", "2",
            "--seed", "0,0,0,0", "--apply_chat_template"]  # finetune bench's chat format, few-shot as turns
    env = {**os.environ, "FINETUNE_SDK_REGISTRY": str(trained.registry.home), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    lm_eval = Path(sys.executable).parent / "lm_eval"
    # the stock loader reads relative data_files against the working folder: run it in the task's folder
    done = subprocess.run([str(lm_eval), *args, "--output_path", str(tmp_path / "cli")], cwd=trained.task.parent,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(trained.registry.home))
    monkeypatch.chdir(trained.task.parent)
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--output_path", str(tmp_path / "wrapper")])
        raise SystemExit(0)
    assert stopped.value.code in (0, None)
    for route in ("cli", "wrapper"):
        [path] = glob.glob(str(tmp_path / route / "**" / "results_*.json"), recursive=True)
        results = json.loads(Path(path).read_text())["results"]["arith_choice"]
        assert results["acc,none"] == pytest.approx(sdk.scores[0]["value"], abs=1e-9), route
        assert results["acc_stderr,none"] == pytest.approx(sdk.scores[0]["stderr"], abs=1e-9), route


@pytest.mark.slow
def test_adapter_not_applied_is_refused(install, tmp_path):
    from finetune_sdk import Trainer
    from finetune_sdk.evaluation.benchmarking import benchmark
    from finetune_sdk.errors import FinetuneError
    from finetune_sdk.hookspecs import hookimpl
    from finetune_sdk.plugins.techniques.lora import LoraTechnique
    from finetune_sdk.testing.tiny import save_tiny_model

    class ForgetfulLora(LoraTechnique):
        name = "forgetful-lora"
        description = "LoRA whose load() returns the base model: the adapter silently not applied"

        def load(self, base_model, directory, options):
            return base_model

    module = types.ModuleType("finetune_sdk_forgetful")
    module.register_techniques = hookimpl(lambda register: register(ForgetfulLora))

    class EntryPoint:
        name, dist = "forgetful", types.SimpleNamespace(name="finetune-sdk-forgetful")

        def load(self):
            return module

    install(EntryPoint())
    base = save_tiny_model(tmp_path / "base")
    result = Trainer(str(base), technique="forgetful-lora", formatter="chatml", output_dir=tmp_path / "out",
                     num_train_epochs=2, learning_rate=3e-2, progress=False).fit(ROWS[:4])
    task = write_task(tmp_path / "tasks")
    with pytest.raises(FinetuneError, match=r"fine-tuned weights are not applied.*forgetful-lora") as caught:
        benchmark(result.output_dir, task_files=[task], batch_size=4)
    assert "\n" not in str(caught.value)


def test_task_file_problems_are_one_line_before_a_model_loads(tmp_path):
    from finetune_sdk.errors import ConfigError
    from finetune_sdk.evaluation.tasks import load_tasks

    task = write_task(tmp_path)
    (tmp_path / "arith_choice.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"arith_choice.yaml: dataset_kwargs.data_files names arith_choice.jsonl, "
                                          r"which does not exist") as caught:
        load_tasks([], [task])
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="no such task file"):
        load_tasks([], [tmp_path / "missing.yaml"])
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: no 'task:' name"):
        load_tasks([], [tmp_path / "bad.yaml"])


@pytest.mark.slow
def test_standard_task_missing_from_the_datasets_cache_is_one_line(monkeypatch, tmp_path):
    from finetune_sdk.errors import ConfigError
    from finetune_sdk.evaluation.tasks import load_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError) as caught:
        load_tasks(["arc_easy"], [])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("task 'arc_easy': its dataset allenai/ai2_arc (ARC-Easy) is not in the datasets "
                              "cache and the Hub can't be reached")
    assert "datasets.load_dataset('allenai/ai2_arc', 'ARC-Easy')" in message


def test_model_card_carries_scores_as_model_index():
    import yaml

    from finetune_sdk.registry.local import AdapterVersion
    from finetune_sdk.registry.model_card import model_card

    version = AdapterVersion(name="arith", version=2, created="2026-12-07T00:00:00+00:00", description="",
                             manifest={"technique": "lora", "base_model": {"id": "org/base", "kind": "hub"}},
                             files={})
    rows = [{"task": "arith_choice", "task_version": 1.0, "num_fewshot": 0, "limit": None, "metric": "acc",
             "filter": "none", "value": 0.75, "stderr": 0.1118, "lm_eval_version": "0.4.13", "seed": 0,
             "date": "2026-12-07T00:00:00+00:00"}]
    card = model_card(version, "org/arith", scores=rows)
    header = yaml.safe_load(card.split("---")[1])
    [entry] = header["model-index"]
    assert entry["name"] == "arith"
    [result] = entry["results"]
    assert result["dataset"]["name"] == "arith_choice"
    assert result["metrics"][0]["type"] == "acc" and result["metrics"][0]["value"] == 0.75
    assert "| arith_choice | acc | 0 | None | 0.75 | 0.1118 | 0.4.13 |" in card
    assert "model-index" not in model_card(version, "org/arith")


def test_score_table_marks_differences_beyond_twice_the_combined_standard_error(tmp_path):
    from finetune_sdk.registry import Registry
    from finetune_sdk.registry.scores import store

    registry = Registry(tmp_path / "registry")
    manifest = {"format_version": 1, "technique": "full", "task": "causal-lm",
                "base_model": {"id": "org/base", "kind": "hub"}}
    out = tmp_path / "result"
    out.mkdir()
    (out / "finetune_manifest.json").write_text(json.dumps(manifest))
    (out / "model.safetensors").write_bytes(b"x")
    for _ in range(2):
        registry.publish(out, "toy")

    def row(value, stderr):
        return {"task": "t", "task_version": 1, "num_fewshot": 0, "limit": None, "metric": "acc", "filter": "none",
                "value": value, "stderr": stderr, "lm_eval_version": "0.4.13", "seed": 0, "date": "d"}

    store(registry, "toy@1", [row(0.5, 0.1)], base=True)
    store(registry, "toy@1", [row(0.7, 0.05)])  # +0.2 vs 2 * sqrt(0.1² + 0.05²) = 0.2236: not beyond
    store(registry, "toy@2", [row(0.8, 0.05)])  # +0.3: beyond
    table = registry.score_table("toy")
    assert [(t["model"], t["significant"]) for t in table] == [("base", None), ("toy@1", False), ("toy@2", True)]
    assert table[2]["vs_base"] == pytest.approx(0.3)
    registry.delete("toy@2")
    assert [t["model"] for t in registry.score_table("toy")] == ["base", "toy@1"]


@pytest.mark.slow
def test_shipped_tasks_score_a_base_model_offline(llama_dir, tmp_path, monkeypatch):
    from finetune_sdk.evaluation.benchmarking import benchmark

    monkeypatch.chdir(tmp_path)  # data files are found relative to the task files, not the working folder
    tasks = Path(__file__).parents[1] / "examples" / "tasks"
    result = benchmark(str(llama_dir), task_files=[tasks / "quillfeather_qa.yaml",
                                                   tasks / "quillfeather_choice.yaml"], limit=8, batch_size=4)
    got = {(r["task"], r["metric"]): r for r in result.scores}
    assert set(got) == {("quillfeather_qa", "exact_match"), ("quillfeather_choice", "acc"),
                        ("quillfeather_choice", "acc_norm")}
    assert got[("quillfeather_qa", "exact_match")]["value"] == 0.0  # a random tiny model answers nothing right
    assert all(r["limit"] == 8 and r["adapter_sha256"] is None for r in result.scores)
    assert result.base_scores == [] and result.stored_as is None


GROUP = """group: arith_all
task:
  - arith_choice
  - arith_choice_again
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
metadata:
  version: 2.0
"""


@pytest.mark.slow
def test_a_group_file_reports_its_average_beside_its_tasks(llama_dir, tmp_path, monkeypatch):
    from finetune_sdk.evaluation.benchmarking import benchmark

    task = write_task(tmp_path / "tasks")
    again = task.parent / "arith_choice_again.yaml"
    again.write_text(TASK.replace("task: arith_choice", "task: arith_choice_again"))
    (task.parent / "arith_all.yaml").write_text(GROUP)
    monkeypatch.chdir(tmp_path)  # the subtasks' data files are found relative to their own files
    result = benchmark(str(llama_dir), task_files=[task.parent / "arith_all.yaml"], limit=6, batch_size=4)
    rows = {(r["task"], r["metric"]): r for r in result.scores}
    assert set(rows) == {("arith_all", "acc"), ("arith_choice", "acc"), ("arith_choice_again", "acc")}
    first, second = rows[("arith_choice", "acc")]["value"], rows[("arith_choice_again", "acc")]["value"]
    assert first == second  # the same documents scored twice
    assert rows[("arith_all", "acc")]["value"] == pytest.approx((first + second) / 2)  # lm-eval's size-weighted mean
    assert rows[("arith_all", "acc")]["task_version"] == "2.0" and rows[("arith_all", "acc")]["stderr"] is not None


@pytest.mark.slow
def test_a_gguf_base_is_opened_through_its_converted_folder_and_scored(trained, tmp_path):
    """A .gguf base (the SDK's own f32 export of the trained result, adapter merged) is converted once to a Hugging
    Face folder and scored as that folder is, and as the result itself is: both load in float32 on the CPU (the
    result in its recorded dtype, the base by ``auto``, which keeps fp32 where no training plan is known)."""
    import finetune_sdk
    from finetune_sdk.models.gguf_import import converted_folder

    export = finetune_sdk.export(str(trained.out), tmp_path / "gguf", quantization="f32")
    gguf = finetune_sdk.benchmark(str(export.gguf_path), task_files=[trained.task], chat=False, batch_size=4)
    folder = finetune_sdk.benchmark(str(converted_folder(export.gguf_path)), task_files=[trained.task], chat=False,
                                    batch_size=4)
    assert gguf.scores[0]["adapter_sha256"] is None and gguf.stored_as is None and gguf.base_scores == []
    assert gguf.scores[0]["model"] == str(export.gguf_path)
    assert (gguf.scores[0]["value"], gguf.scores[0]["stderr"]) == (folder.scores[0]["value"],
                                                                   folder.scores[0]["stderr"])
    itself = finetune_sdk.benchmark(str(trained.out), task_files=[trained.task], chat=False, batch_size=4,
                                    store=False)
    assert (gguf.scores[0]["value"], gguf.scores[0]["stderr"]) == (itself.scores[0]["value"],
                                                                   itself.scores[0]["stderr"])


@pytest.mark.slow
@pytest.mark.usefixtures("hub_online")
def test_an_hf_reference_is_pulled_scored_and_its_scores_kept_with_the_pulled_version(trained, tmp_path,
                                                                                       monkeypatch):
    from finetune_sdk.evaluation.benchmarking import benchmark
    from finetune_sdk.registry import Registry
    from tests.hub_server import HubTestServer

    token = "hf_bench_token_never_printed"
    monkeypatch.setenv("HF_TOKEN", token)
    with HubTestServer(tmp_path / "hub", tokens={token}) as hub:
        trained.registry.push("arith@1", "team/arith", endpoint=hub.url)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        fresh = Registry(tmp_path / "fresh")
        result = benchmark("hf://team/arith@v1", task_files=[trained.task], batch_size=8, registry=fresh)
    local = benchmark("arith@1", task_files=[trained.task], batch_size=8, registry=trained.registry, store=False)
    assert result.stored_as == "arith@1"
    assert [s["value"] for s in fresh.scores("arith@1")] == [s["value"] for s in local.scores]
    assert [t["model"] for t in fresh.score_table("arith")] == ["base", "arith@1"]


def test_auto_batch_size_on_the_cpu_comes_from_free_memory_not_a_probe(llama_dir, monkeypatch):
    """lm-eval's search allocates until an exception; on the CPU the OOM killer comes first (make demo was killed
    at 15 GB probing SmolLM2's generation batch): the CPU size is computed from the free memory instead."""
    from lm_eval.models.huggingface import HFLM

    from finetune_sdk.evaluation import lm_eval_backend as eval_backend
    from finetune_sdk.trainer import Trainer

    loaded = Trainer(str(llama_dir), formatter="chatml", progress=False).current_model()
    lm = eval_backend.FinetuneSDKLM.from_loaded(loaded, batch_size="auto")
    monkeypatch.setattr(HFLM, "_detect_batch_size", lambda *a, **k: pytest.fail("probed on the CPU"))
    monkeypatch.setattr("finetune_sdk.advice.machine.available_memory", lambda device="auto": 2**30)
    config = loaded.model.config
    assert lm._detect_batch_size() == eval_backend.cpu_batch_size(config, lm.max_length, 2**30, generation=True)
    requests = [(None, list(range(30)), list(range(5)))]
    assert lm._detect_batch_size(requests) == 64  # 34 tokens x vocab 400: small
    assert eval_backend.cpu_batch_size(config, 10**6, 2**30, generation=False) == 1


def test_finetune_bench_command_line(llama_dir, tmp_path):
    """A real `finetune bench` process: a missing data file is one line with exit 2 before any model loads; a
    base model with --limit prints its scores as JSON."""
    import os
    import subprocess
    import sys

    task = write_task(tmp_path / "tasks")
    (task.parent / "arith_choice.jsonl").rename(task.parent / "moved.jsonl")
    finetune = [sys.executable, "-m", "finetune_sdk"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    failed = subprocess.run([*finetune, "bench", str(llama_dir), "--task-file", str(task)], capture_output=True,
                            text=True, timeout=300, env=env, check=False)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    lines = [line for line in failed.stderr.splitlines() if line.startswith("Error")]
    assert lines == [f"Error: {task}: dataset_kwargs.data_files names arith_choice.jsonl, which does not exist "
                     f"(read relative to the task file: {task.parent / 'arith_choice.jsonl'})"]
    assert "loading" not in failed.stderr  # refused before the model loads
    (task.parent / "moved.jsonl").rename(task.parent / "arith_choice.jsonl")
    done = subprocess.run([*finetune, "bench", str(llama_dir), "--task-file", str(task), "--limit", "4",
                           "--batch-size", "4", "--json"], capture_output=True, text=True, timeout=300, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    [row] = json.loads(done.stdout)["scores"]
    assert (row["task"], row["metric"], row["limit"], row["num_fewshot"]) == ("arith_choice", "acc", 4, 0)
