"""``finetune studio``: the local web dashboard (see :mod:`finetune_sdk.studio`)."""

from __future__ import annotations

import click


@click.command("studio")
@click.option("--runs", default="finetune-runs", show_default=True, help="the runs folder to show and start runs in")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8765, show_default=True,
              help="TCP port (0: any free port)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; anything but loopback is warned about (the token is still required)")
@click.option("--registry-home", default=None, help="registry shown (default: FINETUNE_SDK_REGISTRY or its default)")
def studio_command(runs: str, port: int, host: str, registry_home: str | None) -> None:
    """Serve a local web page to start, watch and compare runs, and browse the registry.

    Prints one URL with a random access token; every request needs it. Runs started from the page keep going
    when the page or the studio closes. Needs: pip install 'finetune-sdk[studio]'.

    \b
    Example:
      finetune studio --runs finetune-runs
    """
    from finetune_sdk.studio import serve

    serve(runs, host=host, port=port, registry_home=registry_home)
