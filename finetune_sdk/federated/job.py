"""The federated job: what the server and every client must agree on, carried in Flower's run config.

The run config is the app's ``[tool.flwr.app.config]`` table, which Flower hands to the ServerApp and to every
ClientApp; the SDK puts the whole job there as one JSON string under :data:`RUN_CONFIG_KEY`. Client-specific
values (where its data is) stay on the client's machine, in the SuperNode's ``--node-config``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.federated.settings import FederatedSettings

RUN_CONFIG_KEY = "finetune-job"
#: Node-config keys a SuperNode is started with (``finetune federated client`` sets them).
NODE_DATA, NODE_EVAL_DATA, NODE_NAME, NODE_RANK = "data", "eval-data", "client-name", "lora-r"


@dataclass
class FederatedJob:
    """Model, technique, options and federated settings of one run (no data, no credentials).

    ``output_dir`` and ``registry_home`` are paths on the server's machine; ``run_token`` tells the launcher
    which run a status file belongs to.
    """

    model: str
    technique: str
    quantizer: str | None
    formatter: str | None
    options: dict[str, Any]
    settings: FederatedSettings
    output_dir: str
    publish_as: str | None = None
    registry_home: str | None = None
    resume: bool = False
    run_token: str = ""
    expected_clients: list[str] = field(default_factory=list)

    def to_run_config(self) -> dict[str, str]:
        data = asdict(self)
        data["settings"] = json.loads(self.settings.to_json())
        return {RUN_CONFIG_KEY: json.dumps(data, sort_keys=True, default=str)}

    @classmethod
    def from_run_config(cls, run_config: Any) -> FederatedJob:
        if RUN_CONFIG_KEY not in run_config:
            raise ConfigError(f"this Flower run has no {RUN_CONFIG_KEY!r} in its run config; start it with "
                              "Trainer.fit_federated or `finetune federated server`")
        data = json.loads(str(run_config[RUN_CONFIG_KEY]))
        data["settings"] = FederatedSettings.from_json(json.dumps(data["settings"]))
        return cls(**data)

    @property
    def state_dir(self) -> Path:
        """Server-side folder of per-round results, the resume checkpoint and the status file."""
        out = Path(self.output_dir)
        return out.with_name(out.name + ".federated")
