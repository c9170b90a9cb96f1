"""What users see while they wait: the training bar in a pseudo-terminal and when piped, steps before results."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
BAR = re.compile(r"training\s.*?(\d+)/(\d+)(?:\s+loss (\d+\.\d{4}))?")


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80", **extra}
    for name in ("FINETUNE_SDK_CRASH_AT_STEP", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        if name not in extra:
            env.pop(name, None)
    return env


def run_in_pty(args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run ``args`` with stdin, stdout and stderr on a pseudo-terminal; return (exit status, what it printed)."""
    import pty

    controller, terminal = pty.openpty()
    proc = subprocess.Popen(args, stdin=terminal, stdout=terminal, stderr=terminal, env=env, close_fds=True)
    os.close(terminal)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError("the command printed nothing for too long")
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(controller)
    return proc.wait(timeout), ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


def bar_states(output: str) -> list[tuple[int, int, str | None]]:
    """Every rendered state of the training bar: (step, max_steps, loss text or None)."""
    states = []
    for piece in re.split(r"[\r\n]", output):
        match = BAR.search(piece)
        if match:
            states.append((int(match.group(1)), int(match.group(2)), match.group(3)))
    return states


def logged_losses(output_dir: Path) -> dict[int, str]:
    history = json.loads((output_dir / "training_log.json").read_text())
    return {entry["step"]: f"{entry['loss']:.4f}" for entry in history if "loss" in entry}


@pytest.fixture
def train_args(tiny_models, tmp_path):
    rows = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
            for a in range(5) for b in range(5)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [sys.executable, "-m", "finetune_sdk", "train", "--model", str(tiny_models("llama")), "--data", str(data),
            "--formatter", "chatml", "--max-steps", "8", "--logging-steps", "2", "--per-device-train-batch-size", "4",
            "--learning-rate", "0.01", "--seed", "3"]


def test_bar_in_a_terminal_shows_the_loss_logged_at_the_same_step(train_args, tmp_path):
    out = tmp_path / "run"
    status, output = run_in_pty([*train_args, "-o", str(out), "--save-steps", "0"], cli_env(TERM="xterm"))
    assert status == 0, output[-3000:]
    logged = logged_losses(out)
    assert sorted(logged) == [2, 4, 6, 8]
    states = bar_states(output)
    assert states and all(total == 8 for _, total, _ in states)
    shown_at = {step: loss for step, _, loss in states}
    for step, loss in logged.items():  # each logging step is drawn with its own loss, not the previous one's
        assert shown_at.get(step) == loss, (step, loss, states)
    for step, _, loss in states:  # between logging steps the bar keeps the latest logged loss
        latest = max((s for s in logged if s <= step), default=None)
        assert loss == (logged[latest] if latest else None), (step, loss, states)
    assert re.search(r"tok/s\s+ETA \d+:\d\d", output)


def test_piped_training_prints_a_line_with_eta_per_logging_step(train_args, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([*train_args, "-o", str(out), "--save-steps", "0"], env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "━" not in proc.stderr and "\r" not in proc.stderr  # no bar drawn into a log
    lines = re.findall(r"step (\d+)/8  loss (\d+\.\d{4}) .*?ETA (\d+:\d\d)", proc.stderr)
    assert [int(step) for step, _, _ in lines] == [2, 4, 6, 8]
    logged = logged_losses(out)
    assert {int(step): loss for step, loss, _ in lines} == logged
    assert lines[-1][2] == "0:00"  # nothing left at the last step
    summary = " ".join(proc.stdout.split())  # the metrics say which loss is the run's mean and which the last
    assert f"train_loss is the mean over the run; the loss logged at the last logging step (step 8) was " \
           f"{logged[8]}." in summary


@pytest.mark.slow
def test_a_resumed_run_starts_its_bar_at_the_resumed_step(train_args, tmp_path):
    out = tmp_path / "run"
    args = [*train_args, "-o", str(out), "--save-steps", "3"]
    crashed = subprocess.run(args, env=cli_env(FINETUNE_SDK_CRASH_AT_STEP="5"), capture_output=True, timeout=300)
    assert crashed.returncode != 0
    status, output = run_in_pty([*args, "--resume"], cli_env(TERM="xterm"))
    assert status == 0, output[-3000:]
    states = bar_states(output)
    assert states[0][0] == 3, states  # checkpoint-3 is the newest complete one
    assert states[-1][0] == 8


def test_generate_prints_progress_before_its_answers(tiny_models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finetune_sdk", "generate", str(tiny_models("llama")), "hello",
                           "--max-new-tokens", "4"], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    output = proc.stdout
    loading, generating = output.find("loading "), output.find("generating 1 answer ...")
    answers = output.find("generations of")
    assert -1 < loading < generating < answers, output


@pytest.mark.slow
def test_demo_prints_progress_before_its_first_result(tiny_models, tmp_path):
    demo = Path(__file__).resolve().parents[1] / "examples" / "quillfeather.py"
    env = cli_env(FINETUNE_SDK_REGISTRY=str(tmp_path / "registry"))
    proc = subprocess.run([sys.executable, str(demo), "--model", str(tiny_models("llama")), "--epochs", "1",
                           "--output-dir", str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    output = proc.stdout
    first_result = output.find("base vs QLoRA fine-tuned")
    steps = [output.find(text) for text in ("loading ", "generating 5 answers", "training ", "evaluating on")]
    assert all(-1 < position < first_result for position in steps), output
    assert "at the first logged step" in output and "averaged over the run" in output
    last_lines = output.strip().splitlines()[-2:]  # the demo ends with the GGUF export and how to run it
    assert last_lines == [f"GGUF file: {tmp_path}/run-gguf/quillfeather-q8_0.gguf",
                          f"run it with Ollama: ollama create quillfeather -f {tmp_path}/run-gguf/Modelfile && "
                          "ollama run quillfeather"], last_lines


def test_gguf_conversion_reports_one_step_and_no_library_bar(tmp_path, monkeypatch, caplog, capfd):
    pytest.importorskip("gguf")
    from finetune_sdk.exporting.gguf_file import write_gguf
    from finetune_sdk.models.gguf_import import converted_folder
    from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    gguf_file = tmp_path / "tiny-llama.gguf"
    write_gguf(tiny_model("llama", tokenizer), tokenizer, gguf_file, quantization="f32")
    monkeypatch.setenv("FINETUNE_SDK_CACHE", str(tmp_path / "cache"))
    capfd.readouterr()
    with caplog.at_level("INFO", logger="finetune_sdk"):
        folder = converted_folder(gguf_file)
    assert (folder / "config.json").is_file()
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("converting tiny-llama.gguf")]
    assert steps == ["converting tiny-llama.gguf to a Hugging Face folder once (cached in "
                     f"{tmp_path / 'cache' / 'gguf'}) ..."]
    printed = capfd.readouterr()
    assert "de-quantizing" not in printed.err + printed.out  # transformers' own bar stays off


def test_a_long_step_without_a_terminal_logs_where_it_stands(monkeypatch, caplog):
    from finetune_sdk import progress

    clock = iter([0.0, 0.0, 10.0, 31.0, 40.0])  # start, then each advance, then the end
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    with caplog.at_level("INFO", logger="finetune_sdk"):
        with progress.activity("generating 5 answers", total=40, unit="tokens") as step:
            for _ in range(3):
                step.advance(10)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "generating 5 answers ..."
    assert messages[1] == "generating 5 answers: 30/40 tokens ETA 0:10"  # 30 of 40 done in 31 s
    assert len(messages) == 3 and messages[2] == "generating 5 answers: done in 40.0 s"


@pytest.mark.usefixtures("hub_online")
def test_publish_push_and_pull_report_their_steps(tiny_models, tmp_path, monkeypatch, caplog):
    from finetune_sdk import Trainer
    from finetune_sdk.registry import Registry
    from tests.hub_server import HubTestServer

    rows = [{"prompt": f"what is {a} plus 1?", "completion": f"{a + 1}"} for a in range(4)]
    result = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "run", max_steps=1,
                     progress=False).fit(rows)
    registry = Registry(tmp_path / "registry")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with HubTestServer(tmp_path / "hub", tokens={"hf_test_token"}) as hub, \
            caplog.at_level("INFO", logger="finetune_sdk"):
        registry.publish(result, "adder")
        registry.push("adder@1", "team/adder", endpoint=hub.url)
        Registry(tmp_path / "fresh").pull("hf://team/adder@v1", endpoint=hub.url)
    messages = [r.getMessage() for r in caplog.records]
    for step in ("publishing run as the next version of adder ...", "pushing adder@1 to the Hub repo team/adder ...",
                 "pulling hf://team/adder@v1 ..."):
        assert step in messages, messages


def test_on_a_terminal_steps_show_live_and_leave_one_line_each(caplog):
    import io

    from rich.console import Console

    from finetune_sdk import progress

    screen = io.StringIO()
    progress.display_on(Console(file=screen, force_terminal=True, width=80, color_system=None))
    try:
        with caplog.at_level("INFO", logger="finetune_sdk"):
            with progress.activity("loading model"):
                with progress.activity("evaluating on 3 examples", total=3, unit="examples") as step:
                    for _ in range(3):
                        step.advance()
    finally:
        progress.display_off()
    shown = screen.getvalue()
    assert re.search(r"evaluating on 3 examples +\d/3 examples", shown)  # drawn live, below the outer step
    done = [line.strip() for line in re.split(r"[\r\n]", ANSI.sub("", shown)) if line.strip().startswith("✓")]
    assert [line.split(" (")[0] for line in done] == ["✓ evaluating on 3 examples", "✓ loading model"]
    assert not [r for r in caplog.records if "loading model" in r.getMessage()]  # no log line on top of it
