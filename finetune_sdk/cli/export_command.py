"""``finetune export``."""

from __future__ import annotations

import click

from finetune_sdk.cli.render import console

QUANTIZATION_NAMES = ("f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


@click.command("export")
@click.argument("ref")
@click.option("--out", "-o", required=True, help="folder for the GGUF file, its Modelfile and a manifest")
@click.option("--format", "export_format", type=click.Choice(["gguf"]), default="gguf", show_default=True,
              help="file format (GGUF for llama.cpp, Ollama, LM Studio)")
@click.option("--quantization", "-q", type=click.Choice(QUANTIZATION_NAMES, case_sensitive=False), default="q8_0",
              show_default=True, help="tensor type of the weight matrices (q4_0/q4_1/q5_0/q5_1 are ggml's block "
              "4/5-bit types)")
@click.option("--name", default=None, help="model name in the file and for Ollama (default: from REF)")
@click.option("--attach", is_flag=True, help="store the GGUF file and Modelfile as artifacts of the registry version "
              "REF (pushed to the Hub with it)")
def export_command(ref: str, out: str, export_format: str, quantization: str, name: str | None,
                   attach: bool) -> None:
    """Merge REF (a result folder or registry ref) and write it as GGUF with an Ollama Modelfile.

    \b
    Example:
      finetune export support-bot@production --quantization q8_0 --out exports/bot
    """
    from finetune_sdk.exporting import export
    from finetune_sdk.log import quiet_third_party_output

    quiet_third_party_output()
    done = export(ref, out, format=export_format, quantization=quantization.lower(), name=name, attach=attach)
    from rich.markup import escape

    out_console = console()
    out_console.print(f"GGUF ({done.quantization}) saved to [bold]{escape(str(done.gguf_path))}[/bold]", soft_wrap=True)
    out_console.print(f"run it with Ollama: [bold]{escape(done.ollama_command)}[/bold]", soft_wrap=True)
