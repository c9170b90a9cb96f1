"""Loading never runs code or unpickles data the user did not explicitly trust (issue 10, item 2)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.errors import FinetuneError, ModelNotFoundError
from finetune_sdk.registry import Registry
from tests.hub_server import HubTestServer
from tests.safety_helpers import assert_refused, forbid_model_loading, invoke, snapshot, write_jsonl

TOKEN = "hf_trust_test_token"


def evil_code(marker: Path) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('remote code ran')\n"


class PicklePayload:
    """Unpickling this creates ``marker`` (a folder): proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def make_hostile(folder: Path, marker: Path) -> None:
    """Make a model or result folder ask for remote code: ``auto_map`` entries and the ``.py`` they name."""
    (folder / "evil.py").write_text(evil_code(marker))
    for name, key in (("config.json", "AutoModelForCausalLM"), ("tokenizer_config.json", "AutoTokenizer")):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["auto_map"] = {"AutoConfig": "evil.EvilConfig", key: "evil.EvilModel"} if name == "config.json" \
                else {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
            path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_models):
    """A LoRA result whose manifest sets trust_remote_code and whose base model and files ship code."""
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "MARKER"
    base = Path(shutil.copytree(tiny_models("llama"), root / "base"))
    rows = [{"prompt": f"{i}?", "completion": f"{i}."} for i in range(8)]
    result = Trainer(base, formatter="chatml", output_dir=root / "result", max_steps=1, progress=False).fit(rows)
    make_hostile(base, marker)
    make_hostile(result.output_dir, marker)
    manifest_path = result.output_dir / "finetune_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["options"]["trust_remote_code"] = True
    manifest_path.write_text(json.dumps(manifest))
    return result.output_dir, marker


@pytest.fixture
def hub(tmp_path):
    with HubTestServer(tmp_path / "hub", tokens={TOKEN}) as server:
        yield server


@pytest.mark.usefixtures("hub_online")
def test_a_hostile_remote_never_runs_its_code(hostile, hub, tmp_path, monkeypatch, caplog):
    folder, marker = hostile
    publisher = Registry(tmp_path / "publisher")
    publisher.publish(folder, "evil")
    publisher.push("evil@1", "team/evil", endpoint=hub.url, token=TOKEN)
    assert b"evil.py" in json.dumps(publisher.resolve("evil@1").files).encode()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(tmp_path / "fresh"))  # an empty registry: generate pulls
    generated = invoke(["generate", "hf://team/evil@v1", "hello", "--max-new-tokens", "2"])
    assert generated.exit_code == 0, generated.output
    assert not marker.exists()
    rows = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "1?", "completion": "1."}])
    for args in (["eval", "hf://team/evil@v1", rows], ["registry", "pull", "hf://team/evil@v1"],
                 ["registry", "show", "evil@1"], ["registry", "verify", "evil@1"],
                 ["merge", "hf://team/evil@v1", "--out", tmp_path / "merged"]):
        result = invoke(args)
        assert result.exit_code == 0, (args, result.output)
        assert not marker.exists(), args
    caplog.set_level("WARNING", logger="finetune_sdk")
    model = finetune_sdk.load("hf://team/evil@v1", registry=Registry(tmp_path / "api"))
    assert model.options["trust_remote_code"] is False
    assert "trained with trust_remote_code; it stays off" in caplog.text
    finetune_sdk.load(tmp_path / "merged")
    assert not marker.exists()


@pytest.mark.slow
def test_the_marker_does_fire_when_the_caller_trusts_the_code(hostile, tmp_path):
    """Control: the hostile files are real; with trust_remote_code=True from the caller the code runs."""
    folder, marker = hostile
    base = json.loads((folder / "finetune_manifest.json").read_text())["base_model"]["path"]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    code = "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1], " \
           "trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", code, base], env=env, capture_output=True, timeout=300)
    assert marker.exists()
    marker.unlink()


def test_trust_comes_only_from_the_caller(hostile, monkeypatch):
    import finetune_sdk.models.sources as loading  # every base model loads through models.load_base_model -> load_model

    folder, marker = hostile
    seen = []
    real = loading.load_model

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", spy)
    finetune_sdk.load(folder)
    assert seen == [False] and not marker.exists()


def pickle_only_model(source: Path, target: Path, marker: Path) -> Path:
    """A model folder with config and tokenizer but weights only as a (hostile) pytorch_model.bin."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    (target / "pytorch_model.bin").write_bytes(pickle.dumps(PicklePayload(marker)))
    return target


def test_a_base_model_with_only_pickled_weights_is_refused(tiny_models, tmp_path, monkeypatch):
    marker = tmp_path / "UNPICKLED"
    base = pickle_only_model(tiny_models("llama"), tmp_path / "bin-model", marker)
    forbid_model_loading(monkeypatch)
    with pytest.raises(ModelNotFoundError, match=r"holds only pickled weights \(pytorch_model.bin\).*never loads "
                                                 r"because unpickling can run code; convert it once"):
        Trainer(base)
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello"}])
    assert_refused(invoke(["train", "--model", base, "--data", data, "-o", tmp_path / "out"]),
                   "holds only pickled weights", "save_pretrained")
    assert_refused(invoke(["generate", base, "hi"]), "holds only pickled weights")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_result_with_a_pickled_adapter_is_refused(tiny_models, tmp_path):
    marker = tmp_path / "UNPICKLED"
    rows = [{"prompt": f"{i}?", "completion": f"{i}."} for i in range(8)]
    result = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "run", max_steps=1,
                     progress=False).fit(rows)
    (result.output_dir / "adapter_model.safetensors").unlink()
    (result.output_dir / "adapter_model.bin").write_bytes(pickle.dumps(PicklePayload(marker)))
    before = snapshot(result.output_dir)
    with pytest.raises(FinetuneError, match=r"holds pickled files \(adapter_model.bin\).*safetensors only"):
        finetune_sdk.load(result.output_dir)
    assert_refused(invoke(["generate", result.output_dir, "hi"]), "adapter_model.bin", "unpickling can run code")
    assert_refused(invoke(["merge", result.output_dir, "--out", tmp_path / "merged"]), "adapter_model.bin")
    assert not marker.exists() and snapshot(result.output_dir) == before


def test_models_load_with_safetensors_only(tiny_models):
    from finetune_sdk.models.sources import ModelSource, load_model

    source = ModelSource("local", str(tiny_models("llama")), str(tiny_models("llama")))
    import transformers

    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_safetensors"))
        return real(*args, **kwargs)

    transformers.AutoModelForCausalLM.from_pretrained = spy
    try:
        load_model(source, "causal-lm", dtype=torch.float32)
    finally:
        transformers.AutoModelForCausalLM.from_pretrained = real
    assert calls == [True]
