"""The Flower ServerApp: runs a federated job (see :mod:`finetune_sdk.federated.rounds`) on the Grid it is given.

It needs the base model (to build the initial adapter and to save each round's result) but never any client's
data. Started by ``Trainer.fit_federated`` (simulation on this machine) or ``finetune federated server``.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from finetune_sdk.federated.audit import install_open_audit
from finetune_sdk.federated.job import FederatedJob
from finetune_sdk.federated.rounds import FederatedServer, write_failure
from finetune_sdk.federated.server_state import write_status

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the job in the run config; the status file says ``completed`` or ``failed`` with the error."""
    from finetune_sdk.log import ensure_handler

    install_open_audit("server")
    ensure_handler()
    job = FederatedJob.from_run_config(context.run_config)
    job.state_dir.mkdir(parents=True, exist_ok=True)
    write_status(job.state_dir, job.run_token, "running")
    try:
        manifest = FederatedServer(job, grid).run()
    except BaseException as exc:
        write_failure(job, exc)
        raise
    write_status(job.state_dir, job.run_token, "completed", metrics=manifest["metrics"])
