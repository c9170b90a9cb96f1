"""``finetune export``."""

from __future__ import annotations

import click

from finetune_sdk.cli.render import console
from finetune_sdk.exporting.quantization import QUANTIZATIONS  # no heavy imports: names and types only

QUANTIZATION_NAMES = tuple(QUANTIZATIONS)


def installed_formats() -> list[str]:
    """The export formats registered through ``register_exporters`` (gguf and plugins'), without importing torch."""
    from finetune_sdk.exporting import exporter_names

    return exporter_names()


@click.command("export")
@click.argument("ref")
@click.option("--out", "-o", required=True, help="folder for the GGUF file, its Modelfile and a manifest")
@click.option("--format", "export_format", type=click.Choice(installed_formats()), default="gguf", show_default=True,
              help="file format: gguf (llama.cpp, Ollama, LM Studio) or one an installed plugin registers")
@click.option("--quantization", "-q", type=click.Choice(QUANTIZATION_NAMES, case_sensitive=False), multiple=True,
              help="GGUF: tensor type of the weight matrices [default: q8_0]; repeat it for one file per type from "
              "one merge (-q q4_k_m -q q8_0). q4_0/q4_1/q5_0/q5_1: ggml's block-32 types; q2_k...q6_k: llama.cpp's "
              "K-quant mixes")
@click.option("--adapter-only", is_flag=True, help="write the LoRA adapter as a GGUF adapter (llama.cpp --lora, "
              "Ollama ADAPTER) plus the unmerged base as GGUF, instead of one merged file")
@click.option("--name", default=None, help="model name in the file and for Ollama (default: from REF)")
@click.option("--attach", is_flag=True, help="store the GGUF file and Modelfile as artifacts of the registry version "
              "REF (pushed to the Hub with it)")
def export_command(ref: str, out: str, export_format: str, quantization: tuple[str, ...], adapter_only: bool,
                   name: str | None, attach: bool) -> None:
    """Write REF (a result folder or registry ref) in an export format: by default merged into one GGUF file with
    an Ollama Modelfile (--format lists the installed formats).

    Architectures: Llama (also with Llama 3.x llama3, linear or yarn RoPE scaling), Mistral, Qwen2, Qwen3,
    Gemma 2, Gemma 3 (text), Phi-3, GPT-2.

    \b
    Example:
      finetune export support-bot@production --quantization q8_0 --out exports/bot
      finetune export support-bot@production -q q4_k_m -q q8_0 --out exports/bot
      finetune export support-bot@production --adapter-only --out exports/bot-lora
    """
    from finetune_sdk.exporting import export
    from finetune_sdk.log import quiet_third_party_output

    quiet_third_party_output()
    quantizations = [q.lower() for q in quantization]
    done = export(ref, out, format=export_format, quantization=(quantizations if len(quantizations) > 1 else
                                                                quantizations[0]) if quantizations else None,
                  name=name, attach=attach, adapter_only=adapter_only)
    from rich.markup import escape

    out_console = console()
    if not hasattr(done, "gguf_path"):  # a plugin's format: its folder
        out_console.print(f"{export_format} export saved to [bold]{escape(str(done.directory))}[/bold]", soft_wrap=True)
        return
    for kind, path in (done.files or {done.quantization: done.gguf_path}).items():
        label = "GGUF LoRA adapter" if kind == "adapter" else f"GGUF ({done.quantization if kind == 'base' else kind})"
        out_console.print(f"{label} saved to [bold]{escape(str(path))}[/bold]", soft_wrap=True)
    out_console.print(f"run it with Ollama: [bold]{escape(done.ollama_command)}[/bold]", soft_wrap=True)
