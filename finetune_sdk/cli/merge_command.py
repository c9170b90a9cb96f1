"""``finetune merge``."""

from __future__ import annotations

import click

from finetune_sdk.cli.render import console


@click.command("merge")
@click.argument("ref")
@click.option("--out", "-o", required=True, help="folder for the standalone merged model")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the saved model: the adapter is merged in float32 into the base as stored on disk "
                   "(never the 4-bit or bf16 training copy), then rounded once to this dtype")
@click.option("--trust-remote-code", is_flag=True,
              help="let the base model repository's own Python code run (never turned on by a result or a download)")
def merge_command(ref: str, out: str, dtype: str, trust_remote_code: bool) -> None:
    """Merge the adapter of REF (a result folder or registry ref) into its base and save a standalone model."""
    from finetune_sdk.log import quiet_third_party_output
    from finetune_sdk.models.merging import merge

    quiet_third_party_output()
    path = merge(ref, out, dtype=dtype, trust_remote_code=trust_remote_code)
    console().print(f"merged model saved to [bold]{path}[/bold] (loads with from_pretrained or finetune_sdk.load)")
