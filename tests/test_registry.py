"""The adapter registry: versions, aliases, lineage, integrity, crash safety, and the Hub round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.cli import cli
from finetune_sdk.errors import FinetuneError, IntegrityError, RegistryError
from finetune_sdk.registry import Registry
from tests.hub_server import HubTestServer

TOKEN = "hf_test_token_do_not_print"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    """Two tiny LoRA results trained with different options (v1 and a follow-up)."""
    rows = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
            for a in range(4) for b in range(4)]
    base = tmp_path_factory.mktemp("results")
    first = Trainer(tiny_models("llama"), formatter="chatml", output_dir=base / "v1", num_train_epochs=2,
                    learning_rate=1e-2, progress=False).fit(rows, eval_data=rows[:4])
    second = Trainer(tiny_models("llama"), formatter="chatml", output_dir=base / "v2", num_train_epochs=3, r=4,
                     learning_rate=1e-2, progress=False).fit(rows[:8], eval_data=rows[:4])
    return first, second


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry")


@pytest.fixture
def hub(tmp_path):
    with HubTestServer(tmp_path / "hub", tokens={TOKEN}) as server:
        yield server


def logits(model, text="what is 1 plus 2?"):
    ids = torch.tensor([model.prompt_ids(text)])
    with torch.no_grad():
        return model.model(input_ids=ids).logits


def test_publish_versions_aliases_lineage_and_diff(registry, trained):
    first, second = trained
    v1 = registry.publish(first, "adder", description="first try", aliases=["production"])
    v2 = first.publish("adder", registry=registry)  # FitResult.publish
    assert (v1.version, v2.version) == (1, 2)
    v3 = registry.publish(second.output_dir, "adder", parent="adder@production", tags=["smaller"])
    assert v3.parent == "adder@1" and v3.tags == ["smaller"]
    assert registry.resolve("adder").version == 3 and registry.resolve("adder@production").version == 1
    assert registry.resolve("adder@v2").version == 2
    shown = registry.show("adder@3")
    assert shown["lineage"] == ["adder@1"] and shown["technique"] == "lora"
    assert shown["base_model"]["id"] and shown["dataset"]["fingerprint"].startswith("sha256:")
    assert v1.files == v2.files  # identical files...
    blobs = [p for p in (registry.home / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == len({f["sha256"] for v in (v1, v3) for f in v.files.values()})  # ...stored once
    diff = registry.diff("adder@1", "adder@3")
    assert diff["options"]["r"] == [8, 4] and diff["options"]["num_train_epochs"] == [2.0, 3.0]
    assert "train_loss" in diff["metrics"] and "dataset_fingerprint" in diff
    assert "adapter_model.safetensors" in diff["files"]
    registry.alias("adder@3", "production")
    assert registry.resolve("adder@production").version == 3
    assert [v.version for v in registry.versions("adder")] == [1, 2, 3]
    assert registry.list()[0]["aliases"] == {"production": 3}


def test_load_by_name_and_alias_gives_the_trained_outputs(registry, trained):
    first, _ = trained
    registry.publish(first, "adder", aliases=["production"])
    direct = finetune_sdk.load(first.output_dir)
    by_alias = finetune_sdk.load("adder@production", registry=registry)
    assert torch.equal(logits(direct), logits(by_alias))


def test_trainer_publish_as_records_a_parent_chain(tiny_models, tmp_path, qa_rows):
    registry = Registry(tmp_path / "reg")
    trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "out", max_steps=2,
                      progress=False, publish_as="seq", registry=registry)
    first = trainer.fit(qa_rows)
    second = trainer.fit(qa_rows[:4])
    assert (first.version.ref, second.version.ref) == ("seq@1", "seq@2")
    assert registry.show("seq@2")["lineage"] == ["seq@1"]


def test_delete_is_refused_while_aliased_and_numbers_are_not_reused(registry, trained):
    first, _ = trained
    registry.publish(first, "bot", aliases=["production"])
    registry.publish(first, "bot")
    with pytest.raises(RegistryError, match="bot@1 is aliased as production"):
        registry.delete("bot@1")
    registry.delete("bot@2")
    assert registry.publish(first, "bot").version == 3
    registry.delete("bot@1", force=True)
    with pytest.raises(RegistryError, match="adapter 'bot' has no version 1; versions: 3"):
        registry.resolve("bot@1")
    registry.verify("bot@3")  # shared blobs survived the deletes


def test_a_changed_byte_in_a_stored_blob_is_refused(registry, trained):
    version = registry.publish(trained[0], "bot")
    sha = version.files["adapter_model.safetensors"]["sha256"]
    blob = registry.blobs.path(sha)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"bot@1: adapter_model.safetensors: stored file is corrupt"):
        registry.verify("bot@1")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        finetune_sdk.load("bot@1", registry=registry)


@pytest.mark.parametrize("name,message", [
    ("a/b", "not allowed"), ("..", "not allowed"), ("a..b", "not allowed"), ("", "is empty"),
    ("x" * 97, "the limit is 96"), ("bad\x07name", "control characters"), ("-lead", "not allowed"),
    ("a\\b", "not allowed"),
])
def test_invalid_names_are_refused_with_nothing_written(registry, trained, name, message):
    with pytest.raises(RegistryError, match=message):
        registry.publish(trained[0], name)
    assert registry.list() == [] and not (registry.home / "blobs").exists()


def test_unknown_references(registry, trained):
    registry.publish(trained[0], "bot", aliases=["staging"])
    with pytest.raises(RegistryError, match="no adapter named 'bto' .*did you mean 'bot'"):
        registry.resolve("bto")
    with pytest.raises(RegistryError, match="adapter 'bot' has no version 7; versions: 1"):
        registry.resolve("bot@7")
    with pytest.raises(RegistryError, match="adapter 'bot' has no alias 'prod'; aliases: staging"):
        registry.resolve("bot@prod")
    with pytest.raises(RegistryError, match="has no version 5"):
        registry.alias("bot@5", "production")
    with pytest.raises(RegistryError, match="looks like a version number"):
        registry.alias("bot@1", "v2")


def test_a_manifest_from_a_newer_format_is_refused(registry, trained, tmp_path):
    import shutil

    folder = tmp_path / "future"
    shutil.copytree(trained[0].output_dir, folder)
    manifest = json.loads((folder / "finetune_manifest.json").read_text())
    manifest["format_version"] = 99
    (folder / "finetune_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FinetuneError, match="manifest format version 99 is newer .*upgrade finetune-sdk"):
        registry.publish(folder, "future")


PUBLISH = "from finetune_sdk.registry import Registry; import sys; print(Registry(sys.argv[1]).publish(sys.argv[2], " \
          "'bot').version)"


def publish_in_subprocess(home, folder, failpoint=None):
    env = {**os.environ, "FINETUNE_SDK_REGISTRY_FAILPOINT": failpoint or ""}
    return subprocess.Popen([sys.executable, "-c", PUBLISH, str(home), str(folder)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("failpoint", ["after_blobs", "during_index"])
def test_a_publish_killed_midway_leaves_no_half_version(registry, trained, failpoint):
    registry.publish(trained[0], "bot")
    proc = publish_in_subprocess(registry.home, trained[1].output_dir, failpoint)
    proc.communicate(timeout=120)
    assert proc.returncode == -9  # SIGKILLed at the failpoint
    assert [v.version for v in registry.versions("bot")] == [1]
    for version in registry.versions("bot"):
        registry.verify(version.ref)
    assert registry.publish(trained[1], "bot").version == 2
    registry.verify("bot@2")
    assert registry.collect_garbage() == 0


def test_concurrent_publishers_get_distinct_consecutive_versions(registry, trained):
    Registry(registry.home)  # create the index first
    procs = [publish_in_subprocess(registry.home, trained[i % 2].output_dir) for i in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(int(out.strip()) for out, _ in outputs) == [1, 2, 3, 4]
    assert [v.version for v in registry.versions("bot")] == [1, 2, 3, 4]


@pytest.mark.usefixtures("hub_online")
def test_hub_round_trip_by_version_and_alias(registry, trained, hub, tmp_path, monkeypatch):
    first, second = trained
    registry.publish(first, "adder", aliases=["production"])
    registry.publish(second, "adder", parent="adder@1")
    from finetune_sdk.registry.scores import store

    store(registry, "adder@1", [{"task": "arith_choice", "task_version": 1.0, "num_fewshot": 0, "limit": None,
                                 "metric": "acc", "filter": "none", "value": 0.75, "stderr": 0.11,
                                 "lm_eval_version": "0.4.13", "seed": 0, "date": "2026-12-07T00:00:00+00:00"}])
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # where huggingface_hub reads tokens
    info = registry.push("adder@1", "team/adder", endpoint=hub.url, private=True)
    assert info["tag"] == "v1"
    registry.push("adder@2", "team/adder", endpoint=hub.url)
    refs = hub.refs("team/adder")
    assert {"v1", "v2"} <= set(refs["tags"]) and "production" in refs["branches"]
    card = hub.read_file("team/adder", "README.md", "v1").decode()
    assert "library_name: peft" in card and "pipeline_tag: text-generation" in card
    assert 'finetune_sdk.load("hf://team/adder@v1")' in card and "AutoPeftModelForCausalLM" in card
    assert 'model-index: [{"name": "adder", "results": [{"dataset": {"name": "arith_choice"' in card  # its scores
    assert "model-index" not in hub.read_file("team/adder", "README.md", "v2").decode()  # v2 has none
    for name in ("README.md", "registry.json", "finetune_manifest.json"):
        assert TOKEN not in hub.read_file("team/adder", name, "v1").decode()

    fresh = Registry(tmp_path / "fresh")  # a wiped local registry
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    pulled = fresh.pull("hf://team/adder@v1")
    assert pulled.ref == "adder@1" and pulled.files == registry.resolve("adder@1").files
    by_alias = fresh.pull("hf://team/adder@production")
    assert by_alias.ref == "adder@1"
    v2 = fresh.pull("hf://team/adder@v2")
    assert v2.parent == "adder@1"
    expected = logits(finetune_sdk.load(first.output_dir))
    assert torch.equal(logits(finetune_sdk.load("hf://team/adder@v1", registry=fresh)), expected)
    assert torch.equal(logits(finetune_sdk.load("hf://team/adder@production", registry=fresh)), expected)

    hub.stop()  # a second pull of the same version needs no network
    assert fresh.pull("hf://team/adder@v1").ref == "adder@1"
    assert TOKEN not in json.dumps(fresh.show("adder@1"))


@pytest.mark.usefixtures("hub_online")
def test_a_changed_byte_in_a_downloaded_file_is_refused(registry, trained, hub, tmp_path, monkeypatch):
    import huggingface_hub

    registry.publish(trained[0], "adder")
    registry.push("adder@1", "team/adder", endpoint=hub.url, token=TOKEN)
    real = huggingface_hub.snapshot_download

    def corrupting(*args, **kwargs):
        path = Path(real(*args, **kwargs))
        target = path / "adapter_model.safetensors"
        data = bytearray(target.read_bytes())
        data[-1] ^= 0x01
        target.write_bytes(bytes(data))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", corrupting)
    fresh = Registry(tmp_path / "fresh")
    with pytest.raises(IntegrityError, match="downloaded adapter_model.safetensors does not match"):
        fresh.pull("hf://team/adder@v1", endpoint=hub.url)
    assert fresh.list() == []


@pytest.mark.usefixtures("hub_online")
def test_remote_failures_are_clear_and_bounded(registry, trained, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(registry.home / "no-saved-login"))
    registry.publish(trained[0], "adder")
    with pytest.raises(RegistryError, match=rf"at {hub.url} was refused \(401\): a valid token"):
        registry.push("adder@1", "team/adder", endpoint=hub.url)
    with pytest.raises(RegistryError, match=rf"at {hub.url} was refused \(401\)") as info:
        registry.push("adder@1", "team/adder", endpoint=hub.url, token="hf_wrong_token_secret")
    assert "hf_wrong_token_secret" not in str(info.value)
    hub.reset_counters()
    hub.fail_next(100, 500)
    with pytest.raises(RegistryError, match=rf"creating team/adder at {hub.url} failed after 3 attempts \(HTTP 500\)"):
        registry.push("adder@1", "team/adder", endpoint=hub.url, token=TOKEN)
    assert hub.request_count == 3
    hub.fail_next(0)
    url = hub.url
    hub.stop()
    with pytest.raises(RegistryError, match=rf"at {url} failed after 3 attempts"):
        registry.pull("hf://team/adder@v1", endpoint=url)


def test_registry_cli(registry, trained, tmp_path):
    runner = CliRunner()
    home = ["registry", "--home", str(registry.home)]
    registry.publish(trained[0], "adder")
    registry.publish(trained[1], "adder", parent="adder@1")
    for args in (["list"], ["versions", "adder"], ["show", "adder@2"], ["diff", "adder@1", "adder@2"],
                 ["alias", "adder@2", "production"], ["tag", "adder@2", "best"], ["verify", "adder@production"],
                 ["list", "--json"]):
        result = runner.invoke(cli, home + args)
        assert result.exit_code == 0, (args, result.output)
    shown = json.loads(runner.invoke(cli, home + ["show", "adder@production", "--json"]).output)
    assert shown["tags"] == ["best"] and shown["lineage"] == ["adder@1"]
    refused = runner.invoke(cli, home + ["rm", "adder@2"])
    assert refused.exit_code == 2 and "aliased as production" in refused.output and "Traceback" not in refused.output
    assert runner.invoke(cli, home + ["rm", "adder@2", "--force"]).exit_code == 0
    for args, message in ((["show", "nope"], "no adapter named 'nope'"), (["show", "a/b"], "not allowed"),
                          (["alias", "adder@9", "x"], "has no version 9")):
        result = runner.invoke(cli, home + args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_train_publish_flag(tiny_models, tmp_path, qa_rows, monkeypatch):
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(tmp_path / "reg"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    result = CliRunner().invoke(cli, ["train", "-m", str(tiny_models("llama")), "--data", str(data), "-f", "chatml",
                                      "-o", str(tmp_path / "out"), "--max-steps", "2", "--publish", "cli-bot"])
    assert result.exit_code == 0, result.output
    assert "published as cli-bot@1" in result.output
    assert Registry(tmp_path / "reg").resolve("cli-bot").version == 1
    gen = CliRunner().invoke(cli, ["generate", "cli-bot@1", "what is 1 plus 1?", "--max-new-tokens", "3"])
    assert gen.exit_code == 0, gen.output
