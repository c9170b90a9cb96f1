"""``finetune federated server`` and ``finetune federated client``: the same job with each client on its machine.

The server starts a Flower SuperLink, submits the SDK's Flower app with the job, waits for it and stops; each
client starts a Flower SuperNode with its local data files in its node config (they never leave its machine).
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import click

from finetune_sdk.cli.option_flags import option_flags
from finetune_sdk.cli.render import console, metrics_table
from finetune_sdk.errors import ConfigError

TLS_HELP = "TLS: certificate, key and CA files passed to Flower's SuperLink (without them, --insecure is required)"


@click.group("federated")
def federated_group() -> None:
    """Federated fine-tuning on Flower: a server that aggregates, clients that keep their data.

    \b
    Example (server, then one client per data owner):
      finetune federated server --model ./my-model --technique qlora --rounds 5 --min-clients 3 \\
          --address 0.0.0.0:9092 --ssl-certfile server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.pem -o fed
      finetune federated client --server fed.example.org:9092 --root-certificates ca.pem --data local.jsonl
    """


@federated_group.command("server")
@click.option("--model", "-m", required=True, help="model folder or Hub id (every client must have the same)")
@click.option("--technique", "-t", default="lora", show_default=True, help="lora, qlora, full, classifier...")
@click.option("--quantizer", "-q", help="nf4, int8, none (default: the technique's)")
@click.option("--formatter", "-f", help="formatter; default: picked by each client from its data's columns")
@click.option("--output-dir", "-o", required=True, help="where the final global adapter goes")
@click.option("--address", default="127.0.0.1:9092", show_default=True,
              help="HOST:PORT the SuperLink listens on (0.0.0.0:PORT to accept other machines)")
@click.option("--rounds", type=int, default=3, show_default=True, help="federated rounds")
@click.option("--strategy", default="fedavg", show_default=True,
              help="fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg or a plugin's strategy")
@click.option("--strategy-option", "strategy_options", multiple=True, metavar="KEY=VALUE",
              help="the strategy's own setting under Flower's name, e.g. eta=0.01 for fedadam (repeatable)")
@click.option("--aggregation", type=click.Choice(["fedavg", "ffa", "fedex"]), default="fedavg", show_default=True,
              help="how LoRA factors combine: fedavg (each averaged), ffa (FFA-LoRA: A frozen, B averaged: exact) or "
                   "fedex (FedEx-LoRA: averaged, the residual folded into a float32 base: exact)")
@click.option("--preference-reference", type=click.Choice(["start", "round"]), default="start", show_default=True,
              help="DPO/KTO reference each client computes: the run's starting model, or the global model received")
@click.option("--update-compression", type=click.Choice(["int8", "nf4"]),
              help="quantize each client's update before it is sent (default: float32)")
@click.option("--min-clients", type=int, default=2, show_default=True,
              help="clients that must be connected before round 1")
@click.option("--min-fit-clients", type=int, help="fewest replies a round accepts (default: 1)")
@click.option("--fraction-fit", type=float, default=1.0, show_default=True, help="fraction sampled per round")
@click.option("--fraction-evaluate", type=float, default=1.0, show_default=True,
              help="fraction asked for the final held-out evaluation (0: none)")
@click.option("--local-epochs", type=float, default=1.0, show_default=True, help="local passes per round")
@click.option("--local-steps", type=int, default=0, help="local optimizer steps per round instead of epochs")
@click.option("--proximal-mu", type=float, default=0.0, help="FedProx mu")
@click.option("--round-timeout", type=float, default=600.0, show_default=True, help="seconds to wait each round")
@click.option("--dp", type=click.Choice(["server", "client"]), help="differential privacy on client updates")
@click.option("--noise-multiplier", type=float, default=0.0, help="DP Gaussian noise, in units of the clipping norm")
@click.option("--clipping-norm", type=float, default=0.0, help="DP L2 bound on each client's update")
@click.option("--target-delta", type=float, default=1e-5, show_default=True, help="delta epsilon is reported at")
@click.option("--secure-aggregation", is_flag=True,
              help="SecAgg+ (Flower): clients send masked, quantized updates; the server learns only their sum")
@click.option("--secagg-num-shares", type=str, default="1.0", show_default=True,
              help="SecAgg+ shares per client secret: a count > 2 or a fraction of the sampled clients")
@click.option("--secagg-reconstruction-threshold", type=str, default="0.67", show_default=True,
              help="SecAgg+ shares needed to unmask: a count or a fraction of the shares")
@click.option("--secagg-clipping-range", type=float, default=1.0, show_default=True,
              help="SecAgg+ bound on each weighted update coordinate (a client beyond it is refused)")
@click.option("--secagg-quantization-range", type=int, default=2**22, show_default=True,
              help="SecAgg+ integer levels over the clipping range (precision)")
@click.option("--secagg-max-weight", type=float, default=1000.0, show_default=True,
              help="SecAgg+ example count whose weight is 1")
@click.option("--publish", "publish_as", help="publish every round's global adapter to the registry")
@click.option("--resume", is_flag=True, help="continue after the last completed round of an interrupted run")
@click.option("--insecure", is_flag=True, help="no TLS (loopback tests, trusted networks only)")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), help=TLS_HELP)
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), help=TLS_HELP)
@click.option("--ssl-ca-certfile", type=click.Path(exists=True, dir_okay=False), help=TLS_HELP)
@click.option("--enable-supernode-auth", is_flag=True,
              help="Flower's SuperNode authentication: admit only clients whose public key is registered (needs TLS)")
@click.option("--supernode-public-key", "supernode_keys", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="a client's OpenSSH EC public key, registered with Flower before the run (repeatable; implies "
                   "--enable-supernode-auth)")
@option_flags
def server_command(model: str, technique: str, quantizer: str | None, formatter: str | None, output_dir: str,
                   address: str, rounds: int, strategy: str, strategy_options: tuple[str, ...], aggregation: str, preference_reference: str,
                   update_compression: str | None,
                   min_clients: int, min_fit_clients: int | None,
                   fraction_fit: float, fraction_evaluate: float, local_epochs: float, local_steps: int, proximal_mu: float,
                   round_timeout: float, dp: str | None, noise_multiplier: float, clipping_norm: float,
                   target_delta: float, secure_aggregation: bool, secagg_num_shares: str,
                   secagg_reconstruction_threshold: str, secagg_clipping_range: float, secagg_quantization_range: int,
                   secagg_max_weight: float, publish_as: str | None, resume: bool, insecure: bool,
                   ssl_certfile: str | None, ssl_keyfile: str | None, ssl_ca_certfile: str | None,
                   enable_supernode_auth: bool, supernode_keys: tuple[str, ...], **flags: Any) -> None:
    """Run the federated server: SuperLink on --address, the job submitted, the result saved to -o."""
    from finetune_sdk.federated.api import run_server
    from finetune_sdk.federated.settings import FederatedSettings
    from finetune_sdk.trainer import Trainer

    host, port = split_address(address)
    tls = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile, "ssl_ca_certfile": ssl_ca_certfile}
    if not insecure and not all(tls.values()):
        raise ConfigError("the server needs TLS (--ssl-certfile, --ssl-keyfile and --ssl-ca-certfile) or --insecure")
    from finetune_sdk.federated.node_auth import check_server_auth

    check_server_auth(enable_supernode_auth, supernode_keys, insecure, tls)
    settings = FederatedSettings(rounds=rounds, strategy=strategy, aggregation=aggregation,
                                 preference_reference=preference_reference,
                                 strategy_options=parse_strategy_options(strategy_options),
                                 update_compression=update_compression, fraction_fit=fraction_fit,
                                 fraction_evaluate=fraction_evaluate,
                                 min_fit_clients=min_fit_clients, min_available_clients=min_clients,
                                 local_epochs=local_epochs, local_steps=local_steps, proximal_mu=proximal_mu,
                                 round_timeout=round_timeout, dp=dp, noise_multiplier=noise_multiplier,
                                 clipping_norm=clipping_norm, target_delta=target_delta,
                                 secure_aggregation=secure_aggregation,
                                 secagg_num_shares=count_or_fraction(secagg_num_shares, "--secagg-num-shares"),
                                 secagg_reconstruction_threshold=count_or_fraction(
                                     secagg_reconstruction_threshold, "--secagg-reconstruction-threshold"),
                                 secagg_clipping_range=secagg_clipping_range,
                                 secagg_quantization_range=secagg_quantization_range,
                                 secagg_max_weight=secagg_max_weight).validate()
    trainer = Trainer(model, technique=technique, quantizer=quantizer, formatter=formatter, output_dir=output_dir,
                      publish_as=publish_as, progress=False, **{k: v for k, v in flags.items() if v is not None})
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the SuperLink and ServerApp it started, too
    result = run_server(trainer, settings, host=host, port=port, resume=resume, insecure=insecure,
                        tls=None if insecure else tls, supernode_auth=enable_supernode_auth,
                        supernode_keys=list(supernode_keys))
    console().print(metrics_table(result.metrics, title="federated result"))
    console().print(f"saved to [bold]{result.output_dir}[/bold]")


@federated_group.command("client")
@click.option("--server", "server", required=True, help="HOST:PORT of the federated server's SuperLink")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="this client's data")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), help="this client's held-out data")
@click.option("--name", help="how the server's reports name this client (default: the node id)")
@click.option("--lora-r", type=click.IntRange(min=1),
              help="this client's LoRA rank when below the server's r (HetLoRA-style: it trains the global adapter "
                   "truncated to this rank)")
@click.option("--insecure", is_flag=True, help="no TLS (the server must be started with --insecure)")
@click.option("--root-certificates", type=click.Path(exists=True, dir_okay=False),
              help="CA certificate that signed the server's TLS certificate")
@click.option("--auth-key", type=click.Path(exists=True, dir_okay=False),
              help="this client's OpenSSH EC private key, when the server admits only registered keys (needs TLS)")
@click.option("--warm/--no-warm", default=True, show_default=True,
              help="keep the base model loaded between rounds in one long-lived ClientApp process (--no-warm: "
                   "Flower's new process per message, which reloads the model every round)")
def client_command(server: str, data: str, eval_data: str | None, name: str | None, lora_r: int | None,
                   insecure: bool,
                   root_certificates: str | None, auth_key: str | None, warm: bool) -> None:
    """Run a federated client (a Flower SuperNode) until Ctrl-C; it serves the server's runs as they come.

    By default the SuperNode runs its ClientApps in one long-lived process beside it
    (:mod:`finetune_sdk.federated.warm_client`), which keeps the base model loaded across the rounds of a run (it
    is started again should it end while the SuperNode runs); nothing of one run is kept for the next."""
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.federated.runtime import FlowerProcesses, new_work_dir, node_config
    from finetune_sdk.federated.settings import require_flower
    from finetune_sdk.registry.refs import validate_name

    require_flower()
    split_address(server)
    if not insecure and not root_certificates:
        raise ConfigError("the client needs --root-certificates (the CA of the server's certificate) or --insecure")
    if auth_key:
        from finetune_sdk.federated.node_auth import check_private_key

        if insecure:
            raise ConfigError("--auth-key needs TLS (--root-certificates): Flower refuses SuperNode authentication "
                              "over an insecure connection")
        check_private_key(auth_key)
    load_rows(data, name="--data")  # a malformed file is reported here, before connecting
    if eval_data:
        load_rows(eval_data, name="--eval-data")
    client_name = validate_name(name or Path(data).stem, "client name")
    signal.signal(signal.SIGTERM, _interrupt)  # stop the SuperNode in `finally`, not inside the handler
    processes = FlowerProcesses(new_work_dir("finetune-federated-client-"))
    try:
        node = processes.supernode(client_name, server, node_config(client_name, data, eval_data, lora_r),
                                   insecure=insecure, root_certificates=root_certificates, auth_key=auth_key,
                                   log_to_console=True, warm=warm)
        console().print(f"client [bold]{client_name}[/bold] serving {server}; Ctrl-C to leave")
        code = processes.wait_supernode(client_name) if warm else node.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        processes.stop()
        shutil.rmtree(processes.work_dir, ignore_errors=True)  # the scratch folder (job config, Flower home)
    if code:
        raise click.ClickException(f"the Flower SuperNode stopped (exit status {code}); see Flower's message above "
                                   "(its Exit Code 305: the server refused this client or could not be reached, e.g. "
                                   "an --auth-key whose public key the server did not register)")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def parse_strategy_options(items: tuple[str, ...]) -> dict[str, float]:
    """``("eta=0.01", "tau=1e-4")`` as ``{"eta": 0.01, "tau": 0.0001}``; anything else is a one-line error."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise ConfigError(f"--strategy-option must be KEY=NUMBER (e.g. eta=0.01), got {item!r}")
    return options


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` as ``(host, port)``; anything else is a one-line error."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {address!r} is not HOST:PORT (e.g. 127.0.0.1:9092)")
    return host.strip("[]"), int(port)


def count_or_fraction(text: str, flag: str) -> int | float:
    """``"3"`` as the count 3, ``"0.5"`` as the fraction 0.5 (SecAgg+ takes either)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ConfigError(f"{flag} must be a count (e.g. 3) or a fraction (e.g. 0.5), got {text!r}") from None
