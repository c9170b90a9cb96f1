"""Safety rules that slipped (issue 22, kind 11): a full disk while saving is one line and leaves nothing; report
folders go through the output-path rules; every read of a registry version verifies what it serves; pulls of
hostile repos draw no progress bars; a pull under ``HF_HUB_OFFLINE=1`` says so at once."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest

from finetune_sdk.errors import ConfigError, FinetuneError, IntegrityError
from finetune_sdk.registry import Registry
from tests.hub_server import HubTestServer
from tests.safety_helpers import assert_refused, forbid_model_loading, invoke, scratch_left, write_jsonl

QA = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."} for a in range(3)
      for b in range(3)]
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def fill_the_disk(monkeypatch, checkpoints: bool = True) -> list[str]:
    """Every safetensors writer (PEFT's, transformers', the SDK's) writes a partial file, then fails as
    safetensors does on a full disk (checkpoints too, unless ``checkpoints`` is False); returns the paths it was
    asked to write."""
    import peft.peft_model
    import safetensors.torch
    import transformers.modeling_utils
    from safetensors import SafetensorError

    asked: list[str] = []
    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        if not checkpoints and ".checkpoints" in str(filename):
            return real(tensors, filename, metadata=metadata)
        asked.append(str(filename))
        Path(filename).write_bytes(b"\0" * 4096)
        raise SafetensorError(DISK_FULL)

    for module, name in ((safetensors.torch, "save_file"), (peft.peft_model, "safe_save_file"),
                         (transformers.modeling_utils, "safe_save_file")):
        monkeypatch.setattr(module, name, full)
    return asked


def lora_result(base: Path, out: Path, **options):
    from finetune_sdk import Trainer

    return Trainer(base, formatter="chatml", output_dir=out, max_steps=1, progress=False, **options).fit(QA)


def test_a_full_disk_while_the_result_is_saved_is_one_line_and_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", QA)
    base = tiny_models("llama")
    asked = fill_the_disk(monkeypatch, checkpoints=False)
    out = tmp_path / "runs" / "qa"
    result = invoke(["train", "-m", base, "--data", data, "-f", "chatml", "--max-steps", "1",
                     "-o", out])
    line = assert_refused(result, f"can't write {out}: No space left on device (the disk holding {out.parent} has ",
                          " free; the save had written ", " KiB and needed more); nothing was saved: free space or "
                          "pick another location")
    assert len(result.output.strip().splitlines()) == 1 and "os error" not in line
    assert asked and asked[0].endswith("adapter_model.safetensors")
    # no result, no staging or work folder; the checkpoints stay for --resume once there is space, and the run's
    # event log (docs/studio.md) ends with the failure, so the studio shows why the run did not finish
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["qa.checkpoints", "qa.run"]
    events = [json.loads(line) for line in (out.parent / "qa.run" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "failed" and "No space left on device" in events[-1]["error"]


def test_a_full_disk_in_every_save_path_is_a_finetune_error_naming_the_folder(tiny_models, tmp_path, monkeypatch):
    import finetune_sdk
    from finetune_sdk import Trainer

    base = tiny_models("llama")
    good = lora_result(base, tmp_path / "good")
    registry = Registry(tmp_path / "registry")
    registry.publish(good.output_dir, "bot")
    fill_the_disk(monkeypatch, checkpoints=False)
    saves = {
        "classifier": (tmp_path / "cls", lambda: Trainer(base, technique="classifier", output_dir=tmp_path / "cls",
                                                         max_steps=1, progress=False, cache_features=False).fit(
            [{"text": "red", "label": "colour"}, {"text": "cat", "label": "animal"}] * 4)),
        "merge": (tmp_path / "merged", lambda: finetune_sdk.merge(good.output_dir, tmp_path / "merged")),
    }
    for what, (folder, save) in saves.items():
        with pytest.raises(FinetuneError) as caught:
            save()
        message = str(caught.value)
        assert message.startswith(f"can't write {folder}: No space left on device (the disk holding "), (what, message)
        assert "\n" not in message and " free; the save had written " in message, (what, message)
        assert not folder.exists(), what
        assert scratch_left(folder.parent) == [] if folder.parent.exists() else True
    monkeypatch.undo()
    fill_the_disk(monkeypatch)  # now the first checkpoint meets the full disk
    with pytest.raises(FinetuneError) as caught:
        lora_result(base, tmp_path / "ckpt", save_steps=1)
    checkpoint = tmp_path / "ckpt.checkpoints" / "checkpoint-1"
    assert str(caught.value).startswith(f"can't write {checkpoint}: No space left on device (the disk holding ")
    assert not checkpoint.exists() and not list(checkpoint.parent.glob(".staging-*"))
    assert not (tmp_path / "ckpt").exists()


def test_a_full_disk_during_export_and_registry_checkout_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    import gguf

    import finetune_sdk
    import finetune_sdk.registry.blobs as blobs

    good = lora_result(tiny_models("llama"), tmp_path / "good")

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(FinetuneError, match=f"can't write {tmp_path / 'gguf'}: No space left on device \\(the disk"):
        finetune_sdk.export(good.output_dir, tmp_path / "gguf", quantization="f16")
    assert not (tmp_path / "gguf").exists() and scratch_left(tmp_path) == []

    registry = Registry(tmp_path / "registry")
    version = registry.publish(good.output_dir, "bot")
    real_open = open

    def opening(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded"))
        return handle

    monkeypatch.setattr(blobs, "open", opening, raising=False)
    checkout = registry.home / "checkouts" / "bot" / "1"
    with pytest.raises(FinetuneError, match=f"can't write {checkout}: Disk quota exceeded \\(the disk holding"):
        registry.path(version.ref)
    assert not checkout.exists() and scratch_left(checkout.parent) == []


def test_user_os_error_reads_safetensors_errors_and_names_free_space(tmp_path):
    from safetensors import SafetensorError

    from finetune_sdk.training.output_paths import os_error_of, user_os_error

    wrapped = SafetensorError(DISK_FULL)
    assert os_error_of(wrapped).errno == errno.ENOSPC
    message = str(user_os_error(wrapped, tmp_path / "out", written=3 * 2**20))
    assert message.startswith(f"can't write {tmp_path / 'out'}: No space left on device (the disk holding {tmp_path} "
                              "has ")
    assert " free; the save had written 3.0 MiB and needed more); nothing was saved" in message
    assert "the save had written 7 bytes" in str(user_os_error(wrapped, tmp_path, written=7))
    other = SafetensorError("Error while serializing: tensor is not contiguous")
    assert user_os_error(other, tmp_path) is other  # not a disk error: unchanged
    chained = RuntimeError("while saving")
    chained.__context__ = OSError(errno.ENOSPC, "full")  # raised while handling, not from: not this error's cause
    assert user_os_error(chained, tmp_path) is chained


def test_a_report_folder_goes_through_the_output_path_rules(tmp_path, monkeypatch, llama_dir):
    from finetune_sdk.evaluation.report import write_report

    forbid_model_loading(monkeypatch)
    data = write_jsonl(tmp_path / "eval.jsonl", QA)
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    result = invoke(["eval", "nosuchbot@production", data, "--compare-base", "--report-dir", afile])
    assert_refused(result, f"--report-dir {afile} is an existing file; pick a folder for the report")
    assert afile.read_text() == "mine"
    foreign = tmp_path / "someone"
    foreign.mkdir()
    (foreign / "comparison.json").write_text('{"mine": 1}')
    assert_refused(invoke(["eval", "x@1", data, "--compare-base", "--report-dir", foreign]),
                   f"--report-dir {foreign} holds a comparison.json that finetune-sdk did not write")
    assert_refused(invoke(["eval", "x@1", data, "--report-dir", tmp_path / "r"]),
                   "--report-dir writes the comparison report: add --compare-base")
    report = {"base": {"eval_loss": 2.0}, "tuned": {"eval_loss": 1.0}}
    with pytest.raises(ConfigError, match="is an existing file"):
        write_report(afile, report)
    with pytest.raises(ConfigError, match="holds a comparison.json that finetune-sdk did not write"):
        write_report(foreign, report)
    assert (foreign / "comparison.json").read_text() == '{"mine": 1}'
    first = write_report(tmp_path / "report", report)
    again = write_report(tmp_path / "report", {**report, "tuned": {"eval_loss": 0.5}})  # its own: replaced
    assert first == again and json.loads(again["json"].read_text())["tuned"] == {"eval_loss": 0.5}


def test_compare_refuses_a_file_report_dir_before_any_model_runs(tmp_path):
    from finetune_sdk.evaluation.compare import compare_models

    class Untouchable:
        task = "causal-lm"

        def evaluate(self, rows):
            raise AssertionError("evaluated before the report folder was checked")

    afile = tmp_path / "report"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        compare_models(Untouchable(), lambda: Untouchable(), rows=None, report_dir=afile)


def fake_result(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "finetune_manifest.json").write_text(json.dumps(
        {"format_version": 1, "technique": "lora", "task": "causal-lm", "options": {}, "base_model": {}}))
    (folder / "adapter_model.safetensors").write_bytes(payload)
    return folder


def test_a_version_whose_blob_changed_is_refused_although_its_checkout_is_intact(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "registry")
    version = registry.publish(fake_result(tmp_path / "result", b"weights" * 100), "bot", aliases=["production"])
    checkout = registry.path("bot@production")
    blob = registry.blobs.path(version.files["adapter_model.safetensors"]["sha256"])
    blob.write_bytes(b"tampered" + blob.read_bytes()[8:])
    with pytest.raises(IntegrityError, match="bot@1: adapter_model.safetensors: stored file is corrupt"):
        registry.verify("bot@1")
    with pytest.raises(IntegrityError, match="bot@1: adapter_model.safetensors: stored file is corrupt"):
        registry.path("bot@production")
    assert (checkout / "adapter_model.safetensors").read_bytes() == b"weights" * 100  # left as it was
    import finetune_sdk

    with pytest.raises(IntegrityError, match="stored file is corrupt"):
        finetune_sdk.load("bot@production", registry=registry)
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(registry.home))
    assert_refused(invoke(["generate", "bot@production", "hi"]), "bot@1: adapter_model.safetensors: stored file is "
                   "corrupt")


def test_a_changed_checkout_is_rebuilt_and_a_changed_artifact_refused(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.publish(fake_result(tmp_path / "result", b"weights" * 100), "bot")
    checkout = registry.path("bot@1")
    target = checkout / "adapter_model.safetensors"
    target.write_bytes(b"WEIGHTS" * 100)  # same size, same folder: only the hash tells
    assert registry.path("bot@1") == checkout and target.read_bytes() == b"weights" * 100
    gguf = tmp_path / "bot.gguf"
    gguf.write_bytes(b"GGUF" * 50)
    registry.attach("bot@1", gguf)
    served = registry.artifact_path("bot@1", "bot.gguf")
    served.write_bytes(b"FUGG" * 50)
    assert registry.artifact_path("bot@1", "bot.gguf").read_bytes() == b"GGUF" * 50
    blob = registry.blobs.path(registry.artifacts("bot@1")["bot.gguf"]["sha256"])
    blob.write_bytes(b"FUGG" * 50)
    with pytest.raises(IntegrityError, match="bot@1: bot.gguf: stored file is corrupt"):
        registry.artifact_path("bot@1", "bot.gguf")


TOKEN = "hf_save_safety_token"


@pytest.fixture
def hub(tmp_path):
    with HubTestServer(tmp_path / "hub", tokens={TOKEN}) as server:
        yield server


@pytest.mark.usefixtures("hub_online")
def test_a_hostile_pull_is_one_line_without_progress_bars(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    registry = Registry(tmp_path / "publisher")
    registry.publish(fake_result(tmp_path / "result", b"weights" * 100), "good")
    registry.push("good@1", "team/hostile", endpoint=hub.url, token=TOKEN)
    record = json.loads(hub.read_file("team/hostile", "registry.json"))
    record["name"] = "../../evil"
    HfApi(endpoint=hub.url, token=TOKEN).upload_file(path_or_fileobj=json.dumps(record).encode(),
                                                     path_in_repo="registry.json", repo_id="team/hostile")
    monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub's bars would draw even without a terminal
    result = invoke(["registry", "--home", tmp_path / "fresh", "pull", "hf://team/hostile", "--endpoint", hub.url])
    assert_refused(result, "hf://team/hostile", "registry.json names the adapter badly")
    assert result.output.strip().splitlines() == [next(line for line in result.output.splitlines()
                                                       if line.startswith("Error:"))], result.output
    assert "Fetching" not in result.output and "%|" not in result.output


def test_a_pull_in_offline_mode_says_so_at_once_without_a_request(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.reset_counters()
    started = time.monotonic()
    result = invoke(["registry", "--home", tmp_path / "r", "pull", "hf://team/bot@v1", "--endpoint", hub.url])
    elapsed = time.monotonic() - started
    assert_refused(result, "pulling hf://team/bot@v1: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1)",
                   "unset HF_HUB_OFFLINE")
    assert "is the endpoint up" not in result.output and "attempts" not in result.output
    assert hub.request_count == 0 and elapsed < 5
    registry = Registry(tmp_path / "r")
    registry.publish(fake_result(tmp_path / "result", b"w" * 10), "bot")
    assert_refused(invoke(["registry", "--home", tmp_path / "r", "push", "bot@1", "team/bot", "--endpoint", hub.url]),
                   "pushing bot@1 to team/bot: Hugging Face Hub offline mode is on")
    assert hub.request_count == 0


@pytest.mark.usefixtures("hub_online")
def test_a_version_pulled_before_still_loads_offline(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    publisher = Registry(tmp_path / "publisher")
    publisher.publish(fake_result(tmp_path / "result", b"weights" * 100), "bot")
    publisher.push("bot@1", "team/bot", endpoint=hub.url, token=TOKEN)
    local = Registry(tmp_path / "local")
    pulled = local.pull("hf://team/bot@v1", endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.reset_counters()
    assert local.pull("hf://team/bot@v1", endpoint=hub.url).ref == pulled.ref
    assert hub.request_count == 0
