"""A long-lived ClientApp executor for one SuperNode: the base model stays loaded across rounds.

Flower 1.42 starts a new ``flwr-clientapp`` process for every message (``flower-superexec`` launches one per task),
so each client pays Python, torch and transformers start-up and a model load every round. A SuperNode started with
``--isolation process`` leaves launching ClientApps to an outside process; this module is that process: it asks
the SuperNode's Runtime API for the next ClientApp task (``AcquireTask``, as ``flower-superexec`` does) and runs
it in this process with Flower's own ``run_clientapp`` steps (``pull_task_input``, ``install_from_fab``, the app
loaded by ``get_load_client_app_fn``, ``push_message``, ``push_task_output``), then waits for the next.
``pull_task_input`` talks to the SuperNode through :class:`ProgressWatchedClient`: a task whose message never
arrives (the SuperNode dropped it) is given up after :data:`STALE_TASK_SECONDS` instead of stranding every later
task.

Between tasks it keeps a :class:`BaseModelCache`: the freshly loaded base model (never trained, never prepared),
keyed by the run id and everything that decides the load (model, revision, task, quantizer and its settings,
dtype). Each round gets a deep copy of it (:func:`finetune_sdk.models.sources.load_base_model` consults the cache), so a
round starts from exactly what a fresh load gives: the adapter is prepared anew, the global arrays loaded over it,
a new optimizer; FedEx-LoRA's base delta is folded into the copy, never into the cached model. A task of another
run empties the cache first, so nothing of one run reaches another.

``sys.path`` is restored after every task (Flower's app loader adds the run's app folder to it).

Run as ``python -m finetune_sdk.federated.warm_client --runtime-api-address HOST:PORT [--parent-pid PID]``
(:meth:`finetune_sdk.federated.runtime.FlowerProcesses.supernode` with ``warm=True`` does: ``fit_federated`` by
default, ``warm_clients=False`` to turn it off; ``finetune federated client`` unless ``--no-warm``, which also
starts the executor again should it end while its SuperNode runs).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

logger = logging.getLogger("finetune_sdk")
#: Seconds between two ``AcquireTask`` polls when no task is waiting (``flower-superexec`` polls every 1 s).
POLL_SECONDS = 0.2
#: A task whose message gets no object for this many seconds is abandoned (see :class:`ProgressWatchedClient`);
#: the environment variable :data:`STALE_TASK_VARIABLE` overrides it.
STALE_TASK_SECONDS = 60.0
STALE_TASK_VARIABLE = "FINETUNE_SDK_STALE_TASK_SECONDS"


def stale_task_seconds() -> float:
    """Seconds without an arriving object before a task is given up: ``FINETUNE_SDK_STALE_TASK_SECONDS`` when set
    (a positive number), else :data:`STALE_TASK_SECONDS`.

    Raises:
        FinetuneError: the variable is set to something other than a positive number.

    Example:
        >>> stale_task_seconds()  # FINETUNE_SDK_STALE_TASK_SECONDS unset
        60.0
    """
    import math
    import os

    from finetune_sdk.errors import FinetuneError

    raw = os.environ.get(STALE_TASK_VARIABLE, "").strip()
    if not raw:
        return STALE_TASK_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise FinetuneError(f"{STALE_TASK_VARIABLE}={raw!r} is not a positive number of seconds; unset it for the "
                            f"default ({STALE_TASK_SECONDS:.0f} s)")
    return seconds


class BaseModelCache:
    """The base models this process loaded, by load key, for the tasks of one run.

    :meth:`get` returns a deep copy of the cached model (loading it with ``load`` the first time); the cached
    model itself is never handed out, so nothing a round does to its model (an adapter injected, a base delta
    folded in, weights trained) is seen by the next round. :meth:`start_run` empties the cache when the run
    changes.

    Example:
        >>> cache = BaseModelCache()
        >>> cache.start_run(1)
        >>> cache.get(("m",), lambda: [0.0]) == [0.0]
        True
    """

    def __init__(self) -> None:
        self.run_id: int | None = None
        self.models: dict[Hashable, Any] = {}
        self.loads = 0  # fresh loads (for tests and the benchmark)
        self._lock = threading.Lock()

    def start_run(self, run_id: int) -> None:
        """Drop every cached model when ``run_id`` is not the run of the previous task."""
        with self._lock:
            if run_id != self.run_id:
                self.models.clear()
                self.run_id = run_id

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """A deep copy of the model cached under ``key`` (``load()`` called once per key and run)."""
        with self._lock:
            if key not in self.models:
                self.models[key] = load()
                self.loads += 1
                logger.info("warm client: base model loaded for run %s (load %d): %s", self.run_id, self.loads,
                            key[0] if isinstance(key, tuple) and key else key)
            return copy.deepcopy(self.models[key])


#: The cache of this process while it serves tasks (``None`` in any other process: every load is fresh).
ACTIVE_CACHE: BaseModelCache | None = None
#: ``time.time()`` when this process acquired the task it runs (the ClientApp reports the seconds since).
TASK_STARTED: float | None = None


def load_key(source: Any, task: str, quantizer: Any, options: dict[str, Any], dtype: Any) -> Hashable:
    """What decides a base model load: model id/path, revision, task, quantizer and its config, dtype, remote code."""
    config = quantizer.quantization_config(options) if quantizer else None
    return (str(getattr(source, "id", source)), str(getattr(source, "path", "")), str(options.get("revision")),
            task, getattr(quantizer, "name", None), repr(config.to_dict() if hasattr(config, "to_dict") else config),
            str(dtype), bool(options.get("trust_remote_code")))


class ProgressWatchedClient:
    """The SuperNode's Runtime API client, whose ``PullObject`` gives up once no object arrived for ``stale_after``
    seconds; every other call is the client's own.

    Flower 1.42's SuperNode creates a ClientApp task *before* it pulls the message's objects from the SuperLink;
    when the run is no longer ``RUNNING`` by then (a SuperLink restarted on its database, a run stopped) it ignores
    the message but leaves the task, whose objects never arrive. Flower's own executor starts a process per task,
    so such a task only strands its own process (its pull waits up to ``PULL_MAX_TIME``, 2 hours); this executor
    runs tasks one after another, so it would strand every later task (the next run's rounds). Handed to Flower's
    ``pull_task_input``, this client raises ``ObjectPullError`` (a permanent failure, which ends Flower's
    ``pull_objects`` at once) when the SuperNode still has an object unavailable and none arrived for
    ``stale_after`` seconds, counted from the first pull.

    Args:
        client: the Runtime API client (``flwr.supercore.runtime.RuntimeHttpClient``).
        stale_after: seconds without any object arriving.
        clock: monotonic seconds (for tests).

    Example:
        >>> from types import SimpleNamespace
        >>> from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
        >>> runtime = SimpleNamespace(PullObject=lambda request: PullObjectResponse(object_found=True))
        >>> now = iter([0.0, 10.0, 70.0])
        >>> watched = ProgressWatchedClient(runtime, stale_after=60, clock=lambda: next(now))
        >>> watched.PullObject(PullObjectRequest(object_id="a")).object_available  # not there yet: Flower retries
        False
        >>> watched.PullObject(PullObjectRequest(object_id="a"))
        Traceback (most recent call last):
        ...
        flwr.supercore.inflatable.inflatable_utils.ObjectPullError: ...
    """

    def __init__(self, client: Any, stale_after: float = STALE_TASK_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client, self._stale_after, self._clock = client, stale_after, clock
        self._last_arrival = clock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def PullObject(self, request: Any) -> Any:  # noqa: N802 - the Runtime API's name
        from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

        response = self._client.PullObject(request)
        if response.object_found and not response.object_available:
            if self._clock() - self._last_arrival >= self._stale_after:
                raise ObjectPullError(request.object_id, f"no object of the message arrived for "
                                                         f"{self._stale_after:.0f} s: the SuperNode dropped the "
                                                         "message (its run is no longer running)")
        else:
            self._last_arrival = self._clock()
        return response


def run_task(runtime_api_address: str, token: str, cache: BaseModelCache,
             stale_after: float = STALE_TASK_SECONDS) -> None:
    """One ClientApp task, as Flower's ``run_clientapp`` runs it, without leaving the process afterwards; a message
    whose objects stop arriving for ``stale_after`` seconds is given up (:class:`ProgressWatchedClient`).

    ``sys.path`` is restored afterwards: Flower's app loader puts the run's installed app folder first on it (a
    new folder per run), which in a long-lived process would add an entry per run and let one run's folder shadow
    imports of the next."""
    saved_path = list(sys.path)
    try:
        _run_task(runtime_api_address, token, cache, stale_after)
    finally:
        sys.path[:] = saved_path


def _run_task(runtime_api_address: str, token: str, cache: BaseModelCache, stale_after: float) -> None:
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None, retry_invoker=retry_invoker,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, run, fab = pull_task_input(ProgressWatchedClient(client, stale_after))
        cache.start_run(run.run_id)
        install_from_fab(fab.content, skip_prompt=True)
        load_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        client_app = load_app(run.fab_id, run.fab_version, fab.hash_str)
        reply = client_app(message=message, context=context)
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - reported to the server as Flower's run_clientapp reports it
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = str(type(exc)) + ":<'" + str(exc) + "'>"
        if isinstance(exc, LoadClientAppError):
            code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load " \
                                                                "`ClientApp`"
        logger.error("ClientApp raised an exception", exc_info=exc)
        sub_status, details = SubStatus.FAILED, reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as exc:  # noqa: BLE001
            logger.error("could not push the ClientApp's reply", exc_info=exc)
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        heartbeat.stop()
        client.close()


def serve(runtime_api_address: str, parent_pid: int | None = None, max_tasks: int | None = None) -> None:
    """Acquire and run this SuperNode's ClientApp tasks one after another, until the parent process ends (or
    ``max_tasks`` ran). The stale-task limit (:func:`stale_task_seconds`) is read once, before the first task."""
    global ACTIVE_CACHE, TASK_STARTED
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    stale_after = stale_task_seconds()
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    ACTIVE_CACHE = BaseModelCache()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    done = 0
    try:
        while max_tasks is None or done < max_tasks:
            answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            if answer.HasField("task") and answer.token:
                TASK_STARTED = time.time()
                run_task(runtime_api_address, answer.token, ACTIVE_CACHE, stale_after)
                done += 1
            else:
                time.sleep(POLL_SECONDS)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="finetune-sdk's long-lived ClientApp executor for one SuperNode")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) ends")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logger.setLevel(logging.INFO)  # the cache's loads are reported in this executor's log
    serve(args.runtime_api_address, args.parent_pid)


if __name__ == "__main__":  # run as the package's module, so that load_base_model finds ACTIVE_CACHE there
    from finetune_sdk.federated import warm_client

    warm_client.main()
