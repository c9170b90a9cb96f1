"""An error is one line, online or offline (issue 22, kind 8): every CLI error path prints exactly one line (stdout
and stderr together) and exits 2, with ``HF_HUB_OFFLINE=1`` and without; dependency chatter (the ``kernels``
package's "Skipping publisher trust check ... offline mode", logged when bitsandbytes is imported) never joins it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.safety_helpers import invoke

KERNELS_LINE = ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging "
                "Face Hub is in offline mode.")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("bad-inputs")
    (folder / "good.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (folder / "torn.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "cut\n')
    (folder / "a-file.txt").write_text("mine\n")
    (folder / "prompts.txt").write_text("hi\n")
    return folder, tiny_models("llama")


def error_paths(folder: Path, model: Path) -> list[tuple[list[object], str]]:
    """(arguments, a fragment of the one line) for a bad input of every command."""
    home = folder / "registry-home"
    return [
        (["train", "-m", folder / "no-model", "--data", folder / "good.jsonl", "-o", folder / "o"], "does not exist"),
        (["train", "-m", model, "--data", folder / "torn.jsonl", "-o", folder / "o"],
         "line 2: malformed JSON (Unterminated string starting at column 12)"),
        (["train", "-m", model, "--data", folder / "good.jsonl", "-o", folder / "a-file.txt"], "is an existing file"),
        (["train", "-m", model, "--data", folder / "good.jsonl", "-t", "nosuch"], "unknown technique 'nosuch'"),
        (["eval", "nosuchbot@production", folder / "good.jsonl"], "no adapter named 'nosuchbot'"),
        (["eval", "nosuchbot@production", folder / "good.jsonl", "--compare-base", "--report-dir",
          folder / "a-file.txt"], "--report-dir"),
        (["generate", "nosuchbot@production", "hi"], "no adapter named 'nosuchbot'"),
        (["predict", "nosuchbot@production", "hi"], "no adapter named 'nosuchbot'"),
        (["feedback", "nosuchbot@production", "--prompts", folder / "prompts.txt", "--out", folder / "r.jsonl"],
         "no adapter named 'nosuchbot'"),
        (["merge", "nosuchbot@production", "--out", folder / "m"], "no adapter named 'nosuchbot'"),
        (["export", "nosuchbot@production", "--out", folder / "e"], "no adapter named 'nosuchbot'"),
        (["advise", folder / "no-model"], "does not exist"),
        (["registry", "--home", folder / "a-file.txt", "list"], "is a file, not a folder"),
        (["registry", "--home", home, "show", "nosuchbot@production"], "no adapter named 'nosuchbot'"),
        (["registry", "--home", home, "versions", "nosuchbot"], "no adapter named 'nosuchbot'"),
        (["registry", "--home", home, "verify", "nosuchbot@1"], "no adapter named 'nosuchbot'"),
        (["registry", "--home", home, "diff", "a@1", "b@1"], "no adapter named 'a'"),
        (["registry", "--home", home, "alias", "nosuchbot@1", "production"], "no adapter named 'nosuchbot'"),
        (["registry", "--home", home, "tag", "nosuchbot@1", "x"], "no adapter named 'nosuchbot'"),
        (["registry", "--home", home, "rm", "nosuchbot@1"], "no adapter named 'nosuchbot'"),
        (["plugins", "init", "Bad Name!"], "plugin name 'Bad Name!'"),
        (["federated", "server", "-m", folder / "no-model", "-o", folder / "f", "--insecure"], "does not exist"),
        (["federated", "client", "--server", "127.0.0.1:9", "--data", folder / "torn.jsonl", "--insecure"],
         "Unterminated string starting at column 12"),
    ]


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "online"])
def test_every_cli_error_path_is_one_line_and_exit_2(inputs, offline, monkeypatch, tmp_path):
    from huggingface_hub import constants

    folder, model = inputs
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(tmp_path / "default-home"))
    for args, fragment in error_paths(folder, model):
        result = invoke(args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, result.output)
        assert fragment in lines[0], (args, lines[0])
    assert not (tmp_path / "default-home").exists()  # failing reads created no registry


def test_known_dependency_messages_drop_that_message_only_inside_the_block(caplog):
    from finetune_sdk.log import known_dependency_messages

    kernels = logging.getLogger("kernels._internals.hf_hub")
    with caplog.at_level(logging.WARNING, logger="kernels._internals.hf_hub"):
        with known_dependency_messages():
            kernels.warning(KERNELS_LINE)
            kernels.warning("Skipping publisher trust check for 'someone-else/kernel' because Hugging Face Hub is in "
                            "offline mode.")  # another repository is news: it shows
            kernels.error("a real error of the kernels package")
        kernels.warning(KERNELS_LINE)  # outside the block: shows
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping publisher trust check for 'someone-else/kernel' because Hugging Face Hub is in offline mode.",
        "a real error of the kernels package", KERNELS_LINE]
    assert not kernels.filters


def fresh_process(args: list[str], offline: bool, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env["FINETUNE_SDK_REGISTRY"] = str(cwd / "default-home")
    code = "import sys; from finetune_sdk.cli.main import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("offline", [True, False], ids=["offline", "online"])
def test_train_on_bad_data_in_a_fresh_process_prints_one_line(inputs, offline, tmp_path):
    """The issue's input: bitsandbytes is first imported by this command, so the kernels line would come now."""
    folder, model = inputs
    done = fresh_process(["train", "-m", model, "--data", folder / "torn.jsonl", "-o", tmp_path / "out"], offline,
                         tmp_path)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and lines == [
        f"Error: {folder / 'torn.jsonl'} line 2: malformed JSON (Unterminated string starting at column 12)"], lines


@pytest.mark.slow
def test_every_error_path_in_a_fresh_offline_process_is_one_line(inputs, tmp_path):
    """Each command as the first in its process (where the dependency imports happen), offline."""
    folder, model = inputs
    code = "\n".join([
        "import json, sys",
        "from click.testing import CliRunner",
        "from finetune_sdk.cli import cli",
        "r = CliRunner().invoke(cli, json.loads(sys.argv[1]))",
        "print(json.dumps([r.exit_code, r.output]))"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_SDK_REGISTRY": str(tmp_path / "default-home")}
    for args, fragment in error_paths(folder, model):
        done = subprocess.run([sys.executable, "-c", code, json.dumps([str(a) for a in args])], env=env,
                              capture_output=True, text=True, timeout=300)
        exit_code, output = json.loads(done.stdout.strip().splitlines()[-1])
        lines = (output + done.stderr).strip().splitlines()
        assert exit_code == 2 and len(lines) == 1 and fragment in lines[0], (args, lines)


@pytest.mark.slow
def test_the_python_api_offline_prints_no_dependency_chatter(inputs, tmp_path):
    """As ``make demo`` runs: a QLoRA Trainer generates before it trains (the first model load imports
    bitsandbytes), then a result loads: stderr holds the SDK's own lines only."""
    folder, model = inputs
    code = "\n".join([
        "import sys, finetune_sdk",
        "from finetune_sdk import Trainer",
        "t = Trainer(sys.argv[1], technique='qlora', formatter='chatml', output_dir=sys.argv[2], max_steps=1,",
        "            progress=False)",
        "t.generate(['hi'], max_new_tokens=2)",
        "t.fit([{'prompt': 'a', 'completion': 'b'}] * 4)",
        "finetune_sdk.load(sys.argv[2]).generate('hi', max_new_tokens=2)"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(model), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Skipping publisher trust check" not in done.stderr + done.stdout
    assert "Failed to load CPU gemm_4bit_forward" not in done.stderr
