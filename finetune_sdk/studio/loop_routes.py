"""The studio's feedback-loop endpoints: chat, rate, retrain, export, compare, federated rounds, benchmark scores.

Added to the app by :func:`add_loop_routes` (called from :func:`finetune_sdk.studio.app.create_app`); every one
calls the SDK through :mod:`~finetune_sdk.studio.chat`, :mod:`~finetune_sdk.studio.rating`,
:mod:`~finetune_sdk.studio.retrain` and :mod:`~finetune_sdk.studio.insights`. Model work (loading, generating,
exporting, comparing) runs on the chat worker's thread; the event loop only waits for it.

Example:
    >>> add_loop_routes(app, folder=runs, root=Path.cwd(), home=home, confine=confine)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from finetune_sdk.errors import ConfigError
from finetune_sdk.studio import insights, pages, rating, retrain
from finetune_sdk.studio.access import json_body
from finetune_sdk.studio.chat import ChatWorker, Settings



async def _on_worker(worker: ChatWorker, function: Any, *args: Any) -> Any:
    return await asyncio.wrap_future(worker.run(function, *args))


def models(root: Path, folder: Any, home: Path) -> dict[str, Any]:
    """What the chat can load: base model folders under ``root``, registry versions, finished runs' results."""
    from finetune_sdk.training.manifest import MANIFEST_NAME
    from finetune_sdk.registry import Registry
    from finetune_sdk.studio import forms

    versions = []
    if (home / "index.db").is_file():
        registry = Registry(home)
        for entry in registry.list():
            versions += [{"ref": v.ref, "parent": v.parent, "formatter": (v.manifest or {}).get("formatter"),
                          "objective": (v.manifest or {}).get("objective")} for v in registry.versions(entry["name"])]
    results = [str(folder.path(n)) for n in folder.names() if (folder.path(n) / MANIFEST_NAME).is_file()]
    return {"base": [str(root / m) for m in forms.model_folders(root)], "versions": versions, "results": results,
            "quantizations": insights.quantizations(), "objectives": {k: v[2] for k, v in retrain.OBJECTIVES.items()}}


def add_loop_routes(app: Any, *, folder: Any, root: Path, home: Path, confine: Any) -> ChatWorker:
    """Add the pages and endpoints of the feedback loop to ``app``; returns the chat worker they share."""
    worker = ChatWorker()
    app.state.chat = worker

    for key in ("chat", "session", "export", "federated", "scores"):
        app.add_api_route(f"/{key}", _page(key), response_class=HTMLResponse, methods=["GET"])

    def model_ref(given: Any) -> str:
        """A model the page names: a path (under the studio's folders) resolved, a reference or Hub id as is."""
        text = str(given or "")
        if text and (Path(text).is_absolute() or (root / text).exists()):
            return str(confine.check(text))
        return text

    def registry() -> Any:
        from finetune_sdk.registry import Registry

        return Registry(home)

    @app.get("/api/models")
    def list_models() -> dict[str, Any]:
        return models(root, folder, home)

    @app.post("/api/chat")
    async def chat(request: Request) -> Any:
        """Server-sent events (read with ``fetch``): each model's answer streamed token by token."""
        body = await json_body(request)
        refs = body.get("models")
        if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
            raise ConfigError("'models' must be a list of model references")
        refs = [model_ref(r) for r in refs]
        events = worker.answer(refs, str(body.get("prompt") or ""), Settings.from_body(body),
                               formatter=body.get("formatter") or None, rater=body.get("rater") or None)
        return StreamingResponse((f"data: {json.dumps(e)}\n\n" for e in events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post("/api/rate")
    async def rate(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        return await asyncio.to_thread(rating.rate, worker, confine, body)

    @app.post("/api/session/next")
    async def session_next(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        body["model"] = model_ref(body.get("model"))
        return await _on_worker(worker, rating.next_in_session, worker, confine, body)

    @app.post("/api/retrain/plan")
    async def retrain_plan(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        return retrain.plan(confine.check(str(body.get("file") or "")), str(body.get("objective") or ""))

    @app.post("/api/retrain")
    async def retrain_start(request: Request) -> dict[str, Any]:
        from finetune_sdk.models.loading import is_result
        from finetune_sdk.registry.refs import validate_name
        from finetune_sdk.studio import forms
        from finetune_sdk.studio.runs import check_name

        body = await json_body(request)
        objective = str(body.get("objective") or "")
        data = confine.check(str(body.get("file") or ""))
        summary = retrain.plan(data, objective)
        if summary["error"]:
            raise ConfigError(summary["error"])
        rated = model_ref(body.get("rated"))
        if not rated:
            raise ConfigError("pick the rated version: the new version is its next stage")
        in_registry = not Path(rated).exists() and is_result(rated)
        publish_as = str(body.get("publish_as") or (rated.split("@")[0] if in_registry else ""))
        if not publish_as:
            raise ConfigError("name the adapter to publish the new version under")
        validate_name(publish_as)
        options = body.get("options") or {}
        errors = forms.check_options(options) if isinstance(options, dict) else {"options": "must be an object"}
        if errors:
            raise ConfigError("; ".join(f"{k}: {v}" for k, v in errors.items()))
        options = {k: v for k, v in options.items() if v not in (None, "")}
        for key in sorted(forms.PATH_OPTIONS & set(options)):  # a config file or result folder: confined as on the form
            options[key] = str(confine.check(str(options[key])))
        retrain.continued_adapter(rated, options, registry())  # a LoRA shape the rated adapter hasn't: refused
        name = check_name(str(body.get("name") or _free_name(folder, f"{publish_as}-{objective}")))
        spec = {"rated": rated, "objective": objective, "data": str(data), "publish_as": publish_as,
                "parent": in_registry, "registry": str(home), "output_dir": str(folder.path(name)), "options": options}
        return {**retrain.start(folder, name, spec, root), "plan": summary}

    @app.post("/api/export")
    async def export(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        quantization = str(body.get("quantization") or "q8_0")
        if quantization not in insights.quantizations():
            raise ConfigError(f"unknown quantization {quantization!r}; use one of "
                              f"{', '.join(insights.quantizations())}")
        out = confine.check(str(body.get("out") or ""))
        return await _on_worker(worker, insights.export_gguf, model_ref(body.get("ref")), out, quantization,
                                registry())

    @app.post("/api/compare")
    async def compare(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        data = confine.check(str(body.get("eval_data") or ""))
        report_dir = confine.check(str(body["report_dir"])) if body.get("report_dir") else None
        prompts = [p for p in str(body.get("prompts") or "").splitlines() if p.strip()]
        ref = model_ref(body.get("ref"))
        report = await _on_worker(worker, insights.compare, ref, data, prompts, report_dir)
        return {key: report.get(key) for key in ("task", "base", "tuned", "generations", "files", "model")}

    @app.get("/api/compare/plot.svg")
    def compare_plot(dir: str) -> Response:  # noqa: A002  (the query parameter's name)
        path = confine.check(dir) / "comparison.json"
        if not path.is_file():
            raise ConfigError(f"no comparison report in {dir}: run compare with a report folder first")
        svg = insights.loss_chart(json.loads(path.read_text()))
        return Response(svg, media_type="image/svg+xml",
                        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})

    @app.get("/api/federated")
    def federated() -> list[dict[str, Any]]:
        return insights.federated_results(registry(), folder.folder) if (home / "index.db").is_file() else \
            insights.federated_results(_NoRegistry(), folder.folder)

    @app.get("/api/scores")
    def scores() -> list[dict[str, Any]]:
        return insights.scoreboard(registry()) if (home / "index.db").is_file() else []

    return worker


def _free_name(folder: Any, stem: str) -> str:
    """``stem-N``, the first N from 1 whose run name and result folder are both free."""
    from finetune_sdk.training.run_events import run_area

    number = 1
    while folder.path(f"{stem}-{number}").exists() or run_area(folder.path(f"{stem}-{number}")).exists():
        number += 1
    return f"{stem}-{number}"


class _NoRegistry:
    """No registry yet (nothing was published): no versions, and none is created by looking."""

    def list(self) -> list[dict[str, Any]]:
        return []


def _page(key: str) -> Any:
    def render(request: Request) -> str:
        return pages.loop_page(key, request.app.state.token)

    return render
