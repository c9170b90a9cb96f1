"""A federation in one process, for fast tests of strategies and of the server's round logic.

:class:`InProcessGrid` implements Flower's ``Grid`` by calling the SDK's ClientApp directly for each node, with
the node config a SuperNode would have; :func:`run_in_process` runs a whole :class:`FederatedJob` on it. There is
no isolation between clients here: real runs use Flower's SuperLink and SuperNodes (``Trainer.fit_federated``).

Example:
    >>> from finetune_sdk.testing.federated import InProcessGrid
    >>> InProcessGrid({"a": ("a.jsonl", None)}, run_config={}).get_node_ids()
    [1]
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from finetune_sdk.federated.job import NODE_DATA, NODE_EVAL_DATA, NODE_NAME, NODE_RANK, FederatedJob


class InProcessGrid(Grid):
    """Flower's ``Grid`` over ClientApp calls in this process; node ``i`` (from 1) is the i-th client.

    A client's tuple may hold a third item, its LoRA rank (HetLoRA-style, :mod:`finetune_sdk.federated.ranks`).
    ``failing`` names clients whose replies are errors (as a crashed or disconnected client's are); a ClientApp
    that raises replies with the error, as in Flower's runtime. Each node's
    ``Context.state`` persists across messages, as a SuperNode keeps it within a run (SecAgg+ relies on it);
    ``messages_sent`` and ``replies`` record the traffic.
    """

    def __init__(self, clients: dict[str, tuple[str, str | None]], run_config: dict[str, Any],
                 failing: Iterable[str] = ()) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process has
        self.nodes: dict[int, dict[str, Any]] = {}
        for node_id, (name, (train, evaluation, *rank)) in enumerate(clients.items(), start=1):
            config: dict[str, Any] = {NODE_NAME: name, NODE_DATA: train}
            if evaluation:
                config[NODE_EVAL_DATA] = evaluation
            if rank and rank[0]:
                config[NODE_RANK] = int(rank[0])
            self.nodes[node_id] = config
        self.run_config = run_config
        self.failing = set(failing)
        self.messages_sent: list[Message] = []
        self.replies: list[Message] = []
        self.states = {node_id: RecordDict() for node_id in self.nodes}  # each node's Context.state, kept per run
        self._run: Any = None
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            key = str(len(self.messages_sent))
            self.messages_sent.append(message)
            self._pending[key] = message
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._answer(self._pending.pop(key)) for key in message_ids if key in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _answer(self, message: Message) -> Message:
        from finetune_sdk.federated.client_app import app

        node_id = message.metadata.dst_node_id
        config = self.nodes[node_id]
        if config[NODE_NAME] in self.failing:
            reply = Message(Error(code=0, reason=f"client {config[NODE_NAME]} disconnected"), reply_to=message)
        else:
            context = Context(run_id=1, node_id=node_id, node_config=dict(config), state=self.states[node_id],
                              run_config=self.run_config)
            try:
                reply = app(copy.deepcopy(message), context)  # a copy, as if it had travelled: apps may change it
            except Exception as exc:  # noqa: BLE001 - Flower's ClientApp process replies with the error too
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            self.states[node_id] = context.state
        self.replies.append(reply)
        return reply


def run_in_process(job: FederatedJob, clients: dict[str, tuple[str, str | None]],
                   failing: Iterable[str] = ()) -> dict[str, Any]:
    """Run ``job`` with its server and every client in this process; returns the final manifest."""
    from finetune_sdk.federated.rounds import FederatedServer

    grid = InProcessGrid(clients, job.to_run_config(), failing)
    return FederatedServer(job, grid).run()
