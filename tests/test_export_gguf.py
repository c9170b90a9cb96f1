"""GGUF export: every supported family round-trips through transformers' GGUF loader (weights, logits, tokenizer,
chat template); QLoRA exports the full-precision merge; the Modelfile; bad requests are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.cli import cli
from finetune_sdk.errors import ConfigError
from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer
from finetune_sdk.testing.tiny_sentencepiece import tiny_sentencepiece_tokenizer

pytest.importorskip("gguf")

#: q8_0 bound on max |logit difference| against the merged float32 model, for logits up to ~1. Measured 0.004-0.062
#: on these models; the 8-bit token embedding of a 64-wide model accounts for most of it.
Q8_0_LOGIT_BOUND = 0.1
F16_LOGIT_BOUND = 1e-2
TEXTS = ["<s>Hello  world, héllo 日本語 ☃ <|im_start|>user\n the cat</s>", " leading space", "  two spaces",
         "tabs\tand\nnewlines\n\n end", "digits 12345 and émojis 🦙", "<|im_end|>"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 1 plus 2?"},
            {"role": "assistant", "content": "3."}, {"role": "user", "content": "and 2 plus 2?"}]
ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
        for a in range(4) for b in range(4)]
CASES = [("llama", "bpe"), ("llama", "sentencepiece"),
         *[pytest.param(family, kind, marks=pytest.mark.slow)
           for family, kind in (("mistral", "sentencepiece"), ("qwen2", "bpe"), ("gpt2", "bpe"))]]


def _base(tmp_path: Path, family: str, tokenizer_kind: str) -> Path:
    tok = tiny_sentencepiece_tokenizer() if tokenizer_kind == "sentencepiece" else tiny_tokenizer()
    folder = tmp_path / f"base-{family}-{tokenizer_kind}"
    tiny_model(family, tok).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _train(base: Path, out: Path, technique: str = "lora", **options) -> Path:
    # an fp32 base (dtype="auto" may pick bf16 on this CPU): the bounds below are for an fp32 merge
    options = {"formatter": "chat-template", "num_train_epochs": 1, "learning_rate": 5e-2, "progress": False,
               "dtype": "float32", **options}
    return Trainer(base, technique=technique, output_dir=out, **options).fit(ROWS).output_dir


def _merged(result: Path):
    loaded = finetune_sdk.load(result, quantized=False)
    return loaded.model.merge_and_unload().eval(), loaded.tokenizer


def _reload(export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(export.directory), export.gguf_path.name
    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder, gguf_file=name))


def _max_logit_diff(a, b, tokenizer) -> float:
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


@pytest.mark.parametrize("family,tokenizer_kind", CASES)
def test_export_round_trips_through_transformers(tmp_path, family, tokenizer_kind):
    result = _train(_base(tmp_path, family, tokenizer_kind), tmp_path / "run")
    merged, tokenizer = _merged(result)
    for quantization, bound in (("f16", F16_LOGIT_BOUND), ("q8_0", Q8_0_LOGIT_BOUND)):
        export = finetune_sdk.export(result, tmp_path / f"gguf-{quantization}", format="gguf",
                                     quantization=quantization)
        assert export.gguf_path.is_file() and export.gguf_path.suffix == ".gguf"
        reloaded, gguf_tokenizer = _reload(export)
        diff = _max_logit_diff(merged, reloaded, tokenizer)
        assert diff <= bound, (quantization, diff)
        assert diff > 0 if quantization == "q8_0" else True  # the q8_0 file really is quantized
        for text in TEXTS:
            assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert gguf_tokenizer.chat_template == tokenizer.chat_template
        assert (gguf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
                == tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True))
        assert (gguf_tokenizer.bos_token_id, gguf_tokenizer.eos_token_id) == (tokenizer.bos_token_id,
                                                                              tokenizer.eos_token_id)


def test_gguf_metadata_holds_the_tokenizer_and_architecture(tmp_path):
    from gguf import GGUFReader

    result = _train(_base(tmp_path, "llama", "sentencepiece"), tmp_path / "run")
    export = finetune_sdk.export(result, tmp_path / "gguf", quantization="q4_0")
    reader = GGUFReader(export.gguf_path)

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "llama"
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[field("tokenizer.ggml.bos_token_id")] == "<s>"
    assert tokens[field("tokenizer.ggml.eos_token_id")] == "</s>"
    assert tokens[field("tokenizer.ggml.padding_token_id")] == "<pad>"
    assert "<0x0A>" in tokens and len(field("tokenizer.ggml.scores")) == len(tokens)
    assert field("tokenizer.chat_template")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["output.weight"] == "Q8_0"  # the output matrix keeps 8 bits with a 4-bit type
    manifest = json.loads((export.directory / "finetune_manifest.json").read_text())
    assert manifest["export"]["quantization"] == "q4_0" and manifest["exported_from"]["technique"] == "lora"


def test_qlora_exports_the_full_precision_merge_not_the_4bit_base(tmp_path):
    import bitsandbytes as bnb
    from gguf import GGUFReader, dequantize

    base = _base(tmp_path, "llama", "bpe")
    result = _train(base, tmp_path / "run", technique="qlora", num_train_epochs=2)
    merged, tokenizer = _merged(result)
    export = finetune_sdk.export(result, tmp_path / "gguf", quantization="f32")
    tensor = next(t for t in GGUFReader(export.gguf_path).tensors if t.name == "blk.0.ffn_down.weight")
    full_precision = merged.model.layers[0].mlp.down_proj.weight.detach()
    exported = torch.tensor(dequantize(tensor.data, tensor.tensor_type)).reshape(full_precision.shape)
    four_bit = finetune_sdk.load(result).model  # as trained: NF4 base + adapter
    layer = four_bit.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    nf4 = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    nf4_merged = nf4 + layer.get_delta_weight("default").float()
    assert (exported - full_precision).abs().max().item() <= 1e-6
    assert (exported - nf4_merged).abs().max().item() > 1e-3  # a 4-bit export would fail the line above
    f16 = finetune_sdk.export(result, tmp_path / "gguf16", quantization="f16")
    assert _max_logit_diff(merged, _reload(f16)[0], tokenizer) <= F16_LOGIT_BOUND


def test_modelfile_has_template_stops_and_the_training_system_prompt(tmp_path):
    result = _train(_base(tmp_path, "qwen2", "bpe"), tmp_path / "run", formatter="chatml",
                    system_prompt="You answer sums.")
    export = finetune_sdk.export(result, tmp_path / "gguf", name="Sum Bot")
    text = export.modelfile_path.read_text()
    assert text.startswith(f"FROM ./{export.gguf_path.name}\n") and export.gguf_path.name == "sum-bot-q8_0.gguf"
    assert ('TEMPLATE """{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}<|im_start|>system\n'
            'You answer sums.<|im_end|>\n{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}') in text
    assert 'SYSTEM """You answer sums."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text
    assert export.ollama_command == f"ollama create sum-bot -f {export.directory}/Modelfile && ollama run sum-bot"


@pytest.mark.slow
def test_formatter_template_is_written_not_the_tokenizers(tmp_path):
    """A model trained with llama2-chat gets the Llama 2 template in the file, rendering what training saw."""
    from finetune_sdk.plugin_manager import get_plugin_host

    result = _train(_base(tmp_path, "llama", "sentencepiece"), tmp_path / "run", formatter="llama2-chat")
    export = finetune_sdk.export(result, tmp_path / "gguf", quantization="f16")
    _, gguf_tokenizer = _reload(export)
    merged, tokenizer = _merged(result)
    formatter = get_plugin_host().create("formatter", "llama2-chat")
    trained = "".join(s.text for s in formatter.prompt_segments("what is 1 plus 2?", tokenizer,
                                                                {"system_prompt": "Be brief."}))
    rendered = gguf_tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert rendered == trained
    assert "[INST]" in export.modelfile_path.read_text()


def test_bad_requests_are_one_line_errors_before_loading(tmp_path):
    from transformers import PhiConfig

    from finetune_sdk.exporting.architectures import family_of

    with pytest.raises(ConfigError, match="supported: gemma2, gemma3_text, gpt2, llama, mistral, phi3, qwen2, qwen3"):
        family_of(PhiConfig())
    result = _train(_base(tmp_path, "llama", "bpe"), tmp_path / "run")
    with pytest.raises(ConfigError, match="unknown GGUF quantization 'q4_k'"):
        finetune_sdk.export(result, tmp_path / "x", quantization="q4_k")
    with pytest.raises(ConfigError, match="unknown GGUF quantization 'iq4_xs'"):
        finetune_sdk.export(result, tmp_path / "x", quantization=["q4_k_m", "iq4_xs"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="format 'onnx'"):
        finetune_sdk.export(result, tmp_path / "x", format="onnx")
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep me")
    out = CliRunner().invoke(cli, ["export", str(result), "--out", str(user_folder)])
    assert out.exit_code == 2 and "not a finetune-sdk export" in out.output and "Traceback" not in out.output
    assert (user_folder / "notes.txt").read_text() == "keep me" and sorted(user_folder.iterdir()) == [
        user_folder / "notes.txt"]
    out = CliRunner().invoke(cli, ["export", str(result), "--out", str(result / "inside")])
    assert out.exit_code == 2 and "overlaps the result" in out.output
    other = tmp_path / "falcon-base"  # a base of a family llama.cpp's converter has but this exporter doesn't
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    manifest = json.loads((result / "finetune_manifest.json").read_text())
    manifest["base_model"] = {"kind": "local", "id": str(other), "path": str(other), "revision": None}
    (result / "finetune_manifest.json").write_text(json.dumps(manifest))
    out = CliRunner().invoke(cli, ["export", str(result), "--out", str(tmp_path / "falcon")])
    assert out.exit_code == 2 and not (tmp_path / "falcon").exists()
    assert out.output.strip().splitlines() == [
        "Error: GGUF export doesn't support model type 'falcon'; supported: gemma2, gemma3_text, gpt2, llama, "
        "mistral, phi3, qwen2, qwen3. Convert the merged model (finetune merge) with llama.cpp's convert_hf_to_gguf.py "
        "instead"]


def test_cli_exports_and_replaces_its_own_earlier_export(tmp_path):
    result = _train(_base(tmp_path, "llama", "bpe"), tmp_path / "run")
    for quantization in ("q8_0", "f16"):
        out = CliRunner().invoke(cli, ["export", str(result), "--format", "gguf", "--quantization", quantization,
                                       "--out", str(tmp_path / "exp")])
        assert out.exit_code == 0, out.output
        assert f"run-{quantization}.gguf" in out.output and "ollama create run -f" in out.output
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["Modelfile", "finetune_manifest.json",
                                                                   "run-f16.gguf"]



@pytest.mark.usefixtures("hub_online")
def test_export_attaches_to_a_registry_version_and_travels_to_the_hub(tmp_path, monkeypatch):
    from finetune_sdk.registry import Registry
    from tests.hub_server import HubTestServer

    token = "hf_test_token_do_not_print"
    registry = Registry(tmp_path / "registry")
    registry.publish(_train(_base(tmp_path, "llama", "bpe"), tmp_path / "run"), "adder")
    with pytest.raises(ConfigError, match="publish it first"):
        finetune_sdk.export(tmp_path / "run", tmp_path / "x", attach=True, registry=registry)
    export = finetune_sdk.export("adder@1", tmp_path / "gguf", quantization="q4_0", attach=True, registry=registry)
    assert export.gguf_path.name == "adder-q4_0.gguf"
    artifacts = registry.artifacts("adder@1")
    assert artifacts["adder-q4_0.gguf"]["kind"] == "gguf"
    assert artifacts["adder-q4_0.gguf"]["metadata"]["quantization"] == "q4_0"
    assert "adder-q4_0.Modelfile" in artifacts
    assert registry.collect_garbage() == 0  # artifacts' blobs are in use
    assert registry.artifact_path("adder@1", "adder-q4_0.gguf").read_bytes() == export.gguf_path.read_bytes()

    with HubTestServer(tmp_path / "hub", tokens={token}) as hub:
        registry.push("adder@1", "team/adder", endpoint=hub.url, token=token)
        card = hub.read_file("team/adder", "README.md", "v1").decode()
        assert "## Exported files" in card and "`artifacts/adder-q4_0.gguf` | gguf | `q4_0`" in card
        assert '- "gguf"' in card
        fresh = Registry(tmp_path / "fresh")
        pulled = fresh.pull("hf://team/adder@v1", endpoint=hub.url, token=token)
        assert fresh.artifacts(pulled.ref) == artifacts
        assert fresh.artifact_path(pulled.ref, "adder-q4_0.gguf").read_bytes() == export.gguf_path.read_bytes()
    registry.delete("adder@1")
    assert registry.collect_garbage() == 0 and not any((registry.home / "blobs").glob("*/*"))


@pytest.mark.parametrize("regex,pre", [
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
     "qwen2"),
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
     "llama-bpe"),
])
def test_split_regex_pre_tokenizers_are_named_for_llama_cpp(tmp_path, regex, pre):
    """Qwen2's and Llama 3's pre-tokenizers (a regex Split before byte-level BPE) keep their ids in the file."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    from finetune_sdk.exporting.gguf_file import write_gguf

    tok = tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    summary = write_gguf(tiny_model("qwen2", tok), tok, tmp_path / "m.gguf", quantization="f16")
    assert summary["pre_tokenizer"] == pre
    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in [*TEXTS, "numbers 1234567 and 89", "it's we'll THEY'RE"]:
        assert reloaded(text)["input_ids"] == tok(text)["input_ids"], text


@pytest.mark.slow
def test_a_full_fine_tune_exports_as_is(tmp_path):
    from transformers import AutoModelForCausalLM

    result = _train(_base(tmp_path, "llama", "bpe"), tmp_path / "run", technique="full")
    export = finetune_sdk.export(result, tmp_path / "gguf", quantization="f16")
    trained = AutoModelForCausalLM.from_pretrained(result, dtype=torch.float32).eval()
    assert _max_logit_diff(trained, _reload(export)[0], tiny_tokenizer()) <= F16_LOGIT_BOUND


@pytest.mark.slow
def test_a_qlora_result_on_a_gguf_base_exports_like_the_demo(tmp_path, monkeypatch):
    """The demo's path: a GGUF base (converted once to a folder), QLoRA, published, exported by registry name."""
    from finetune_sdk.exporting.gguf_file import write_gguf
    from finetune_sdk.registry import Registry

    monkeypatch.setenv("FINETUNE_SDK_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    write_gguf(tiny_model("llama", tok), tok, tmp_path / "base.gguf", quantization="f32",
               chat_template=tok.chat_template)
    registry = Registry(tmp_path / "registry")
    fit = Trainer(tmp_path / "base.gguf", technique="qlora", formatter="chat-template", output_dir=tmp_path / "run",
                  num_train_epochs=1, learning_rate=1e-2, progress=False).fit(ROWS)
    fit.publish("quill", aliases=["production"], registry=registry)
    export = finetune_sdk.export("quill@production", tmp_path / "gguf", registry=registry)
    merged, tokenizer = _merged(tmp_path / "run")
    assert export.gguf_path.name == "quill-q8_0.gguf"
    assert _max_logit_diff(merged, _reload(export)[0], tokenizer) <= Q8_0_LOGIT_BOUND
