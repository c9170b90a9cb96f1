"""The finetune CLI through click's CliRunner, and its start-up in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from finetune_sdk.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def data(tmp_path, qa_rows):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    return path


def test_train_generate_eval(runner, llama_dir, data, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(cli, ["train", "--model", str(llama_dir), "--data", str(data), "--technique", "lora",
                                 "--formatter", "chatml", "--output-dir", str(out), "--num-train-epochs", "2",
                                 "--r", "4", "--learning-rate", "0.01", "--eval-data", str(data)])
    assert result.exit_code == 0, result.output
    assert "train_loss" in result.output and "eval_loss" in result.output
    manifest = json.loads((out / "finetune_manifest.json").read_text())
    assert manifest["options"]["r"] == 4 and manifest["options"]["num_train_epochs"] == 2.0

    gen = runner.invoke(cli, ["generate", str(out), "what is 1 plus 2?", "--max-new-tokens", "5"])
    assert gen.exit_code == 0, gen.output
    assert "what is 1 plus 2?" in gen.output

    ev = runner.invoke(cli, ["eval", str(out), str(data)])
    assert ev.exit_code == 0, ev.output
    assert "perplexity" in ev.output


def test_train_from_a_config_file_flags_win(runner, llama_dir, data, tmp_path):
    config = tmp_path / "run.yaml"
    out = tmp_path / "run"
    config.write_text(f"model: {llama_dir}\ndata: {data}\ntechnique: lora\nformatter: chatml\n"
                      f"output_dir: {out}\noptions:\n  num_train_epochs: 1\n  r: 2\n")
    result = runner.invoke(cli, ["train", "--config", str(config), "--r", "6"])
    assert result.exit_code == 0, result.output
    options = json.loads((out / "finetune_manifest.json").read_text())["options"]
    assert options["r"] == 6 and options["num_train_epochs"] == 1.0
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{llama_dir}"\ndata = "{data}"\nformatter = "chatml"\noutput_dir = "{out}2"\n'
                    "[options]\nmax_steps = 1\n")
    assert runner.invoke(cli, ["train", "--config", str(toml)]).exit_code == 0


def test_predict(runner, llama_dir, tmp_path):
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                            for t, lab in [("red", "colour"), ("cat", "animal")] * 4))
    out = tmp_path / "cls"
    result = runner.invoke(cli, ["train", "-m", str(llama_dir), "--data", str(data), "-t", "classifier",
                                 "-o", str(out), "--num-train-epochs", "1"])
    assert result.exit_code == 0, result.output
    pred = runner.invoke(cli, ["predict", str(out), "red", "cat"])
    assert pred.exit_code == 0, pred.output
    assert "colour" in pred.output or "animal" in pred.output


@pytest.mark.parametrize("args,message", [
    (["train", "--model", "{model}", "--data", "{data}", "--technique", "lroa"], "unknown technique 'lroa'"),
    (["train", "--model", "{model}", "--data", "{data}", "--technique", "full", "--quantizer", "nf4"],
     "technique 'full' can't train a nf4-quantized model"),
    (["train", "--model", "./missing-model", "--data", "{data}"], "model path ./missing-model does not exist"),
    (["train", "--model", "{model}", "--data", "{bad}"], "bad.jsonl line 2: malformed JSON"),
    (["train", "--model", "{model}"], "no training data given"),
    (["train", "--data", "{data}"], "no model given"),
    (["train", "--config", "{missing}"], "does not exist"),
    (["generate", "{model}"], "no prompts given"),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(runner, llama_dir, data, tmp_path, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    out = tmp_path / "never"
    args = [a.format(model=llama_dir, data=data, bad=bad, missing=tmp_path / "none.yaml") for a in args]
    result = runner.invoke(cli, args + (["--output-dir", str(out)] if args[0] == "train" else []))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_plugins_lists_every_builtin_with_distribution(runner):
    result = runner.invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {t["name"] for t in report["techniques"]} >= {"lora", "qlora", "full", "classifier"}
    assert {q["name"] for q in report["quantizers"]} >= {"nf4", "int8"}
    assert {f["name"] for f in report["formatters"]} >= {"llama2-chat", "alpaca", "chatml", "chat-template", "text",
                                                         "classification"}
    assert all(t["distribution"] == "finetune-sdk" and t["version"] for t in report["techniques"])
    table = runner.invoke(cli, ["plugins"])
    assert table.exit_code == 0 and "llama2-chat" in table.output


PROBE = """
import sys
from finetune_sdk.cli.main import cli
try:
    cli.main(args={args!r}, prog_name="finetune", standalone_mode=False)
finally:
    heavy = sorted(m for m in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")
                   if m in sys.modules)
    print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["plugins", "--json"], ["train", "--help"],
                                  ["registry", "list"], ["registry", "--help"], ["feedback", "--help"]])
def test_startup_imports_no_torch(args, tmp_path):
    env = {**os.environ, "FINETUNE_SDK_REGISTRY": str(tmp_path / "registry")}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY:\n" in proc.stderr or proc.stderr.strip().endswith("HEAVY:"), proc.stderr


def test_import_finetune_sdk_imports_no_torch():
    code = "import sys, finetune_sdk; from finetune_sdk import Trainer, hookimpl, load; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr


def test_console_script_help_runs():
    proc = subprocess.run([sys.executable, "-m", "finetune_sdk", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout
