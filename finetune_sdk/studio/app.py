"""The studio's web application (FastAPI): pages, the JSON API and the event stream.

Imports FastAPI at import time: only :func:`finetune_sdk.studio.serve` imports this module, after checking that the
``studio`` extra is installed.

Every endpoint calls the SDK's public API (see docs/studio.md for the mapping); the pages are rendered here from
:mod:`finetune_sdk.studio.pages` and drawn by ``static/studio.js``. :func:`create_app` builds the app; it never
starts a server (see :func:`finetune_sdk.studio.serve`).

Example:
    >>> from fastapi.testclient import TestClient  # doctest: +SKIP
    >>> app = create_app(Path("runs"), Path.cwd(), token="t")  # doctest: +SKIP
    >>> TestClient(app).get("/api/runs", headers={"X-Studio-Token": "t"}).json()  # doctest: +SKIP
    []
"""

from __future__ import annotations

import asyncio
import json
import os
from urllib.parse import urlencode
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from finetune_sdk.errors import FinetuneError
from finetune_sdk.training.run_events import EVENTS_NAME, read_events_from, run_area
from finetune_sdk.studio import forms, pages
from finetune_sdk.studio.access import (COOKIE, HEADER, SAFE_METHODS, Confinement, json_body, origin_allowed,
                                        token_matches)
from finetune_sdk.studio.runs import RunsFolder

STATIC = Path(__file__).parent / "static"
REFUSED = "missing or wrong access token: open the URL `finetune studio` printed (it carries ?token=...)"


def create_app(runs: Path, root: Path, *, token: str, registry_home: Path | None = None,
               poll_seconds: float = 0.3) -> Any:
    """The studio app over the runs folder ``runs``, reading files under ``root``, guarded by ``token``.

    ``registry_home`` (default: ``FINETUNE_SDK_REGISTRY`` or its default) is the registry shown, and the one every
    registry reference the page names (``bot@2`` in the chat, a session, export, compare) resolves in: it becomes
    this process's ``FINETUNE_SDK_REGISTRY``, as ``finetune_sdk.load`` and ``finetune feedback`` read it.
    """
    from finetune_sdk.registry.local import HOME_ENV, default_home

    runs, root = Path(runs).resolve(), Path(root).resolve()
    home = Path(registry_home).expanduser().resolve() if registry_home else default_home()
    if registry_home:  # the models the chat loads by reference resolve in the registry shown
        os.environ[HOME_ENV] = str(home)
    folder = RunsFolder(runs)
    confine = Confinement([root, runs, home], base=root)
    app = FastAPI(title="finetune studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runs, app.state.root, app.state.registry_home = folder, root, home

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        given = request.query_params.get("token")
        if given is not None and request.method == "GET":  # from the printed URL: cookie, then a clean URL
            if not token_matches(given, token):
                return PlainTextResponse(REFUSED, status_code=401)
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            return response
        header = request.headers.get(HEADER)
        if request.method not in SAFE_METHODS:  # CSRF: the header, which no other site's page can send
            if not token_matches(header, token):
                return PlainTextResponse(REFUSED + " (changes need the X-Studio-Token header)", status_code=401)
            if not origin_allowed(request.headers.get("origin"), request.headers.get("host")):
                return PlainTextResponse("refused: the request came from another site (Origin)", status_code=403)
        elif not (token_matches(header, token) or token_matches(request.cookies.get(COOKIE), token)):
            return PlainTextResponse(REFUSED, status_code=401)
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                    "style-src 'self'; frame-ancestors 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    def _options(body: dict[str, Any]) -> dict[str, Any]:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise FinetuneError("'options' must be a JSON object of option name -> value, e.g. {\"r\": 16}")
        return options

    @app.exception_handler(FinetuneError)
    async def one_line(request: Request, exc: FinetuneError) -> Any:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Any:
        """A missing or malformed query parameter: one line naming it, as every other refusal."""
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "path", "body"))
        return JSONResponse({"error": f"{where or 'request'}: {str(first.get('msg', 'invalid')).lower()}; see "
                                      "docs/studio.md for the endpoint's parameters"}, status_code=400)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- pages --------------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def runs_page() -> str:
        return pages.runs_page(folder.list(), runs, token)

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(name: str) -> str:
        return pages.run_page(folder.summary(_known(name)), token)

    @app.get("/new", response_class=HTMLResponse)
    def new_page() -> str:
        return pages.new_run_page(root, token)

    @app.get("/registry", response_class=HTMLResponse)
    def registry_page() -> str:
        return pages.registry_page(home, token)

    # -- runs ---------------------------------------------------------------------------------------------------
    def _known(name: str) -> str:
        if name not in folder.names():
            raise FinetuneError(f"no run named {name!r} in {runs}")
        return name

    @app.get("/api/runs")
    def list_runs() -> list[dict[str, Any]]:
        return folder.list()

    @app.get("/api/runs/{name}")
    def run_summary(name: str) -> dict[str, Any]:
        return {**folder.summary(_known(name)), "events": folder.events(name)}

    @app.post("/api/runs")
    async def start_run(request: Request) -> Any:
        body = await json_body(request)
        args, errors = _train_args(body)
        if not errors:
            try:
                return folder.start(str(body.get("name") or ""), args, root)
            except FinetuneError as exc:  # the name is taken
                errors["name"] = str(exc)
        return JSONResponse({"error": "some values can't be used", "fields": errors}, status_code=400)

    def _train_args(body: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        options = _options(body)
        errors = forms.check_options(options)
        args: list[str] = []
        for key in ("model", "data", "eval_data"):
            if not body.get(key):
                if key != "eval_data":
                    errors[key] = f"pick a {key.replace('_', ' ')}: a file or folder under {root}"
                continue
            try:
                args += [f"--{key.replace('_', '-')}", str(confine.check(body[key]))]
            except FinetuneError as exc:
                errors[key] = str(exc)
        schema = forms.option_schema()
        for key, names in (("technique", schema["techniques"]), ("formatter", schema["formatters"]),
                           ("quantizer", schema["quantizers"] + ["none"])):
            value = body.get(key)
            if value and value not in names:
                errors[key] = f"unknown {key} {value!r}; available: {', '.join(names)}"
            elif value:
                args += [f"--{key}", str(value)]
        try:
            from finetune_sdk.studio.runs import check_name

            check_name(str(body.get("name") or ""))
        except FinetuneError as exc:
            errors["name"] = str(exc)
        specs = forms.form_specs()  # checked above (check_options): each name is known, each value valid
        for name, value in options.items():
            if value in (None, "") or name in errors:
                continue
            flag, coerced = "--" + name.replace("_", "-"), specs[name].coerce(value)
            if specs[name].type is bool:
                args.append(flag if coerced else f"--no-{name.replace('_', '-')}")
                continue
            if name in forms.PATH_OPTIONS:  # a config file or a result folder: confined like model and data
                try:
                    coerced = confine.check(str(value))
                except FinetuneError as exc:
                    errors[name] = str(exc)
                    continue
            args += [flag, ",".join(map(str, coerced)) if isinstance(coerced, list) else str(coerced)]
        return args, errors

    @app.post("/api/runs/{name}/stop")
    def stop_run(name: str) -> dict[str, Any]:
        return folder.stop(_known(name))

    @app.post("/api/runs/{name}/resume")
    def resume_run(name: str) -> dict[str, Any]:
        return folder.resume(_known(name), root)

    @app.get("/api/stream")
    async def stream(request: Request) -> Any:
        """Server-sent events: every event of the named runs from the first on, then new ones as they are written
        (``event: run``, data ``{"run": name, ...event}``), and ``event: status`` when a run's status changes."""
        names = [_known(n) for n in (request.query_params.get("runs") or "").split(",") if n]

        async def events() -> Any:
            offsets = {n: 0 for n in names}
            statuses: dict[str, str] = {}
            while not await request.is_disconnected():
                for name in names:
                    path = run_area(runs / name) / EVENTS_NAME
                    new, offsets[name] = read_events_from(path, offsets[name])
                    for event in new:
                        yield f"event: run\ndata: {json.dumps({'run': name, **event})}\n\n"
                    summary = folder.summary(name)
                    if statuses.get(name) != summary["status"]:
                        statuses[name] = summary["status"]
                        yield f"event: status\ndata: {json.dumps(summary)}\n\n"
                yield ": keep-alive\n\n"
                await asyncio.sleep(poll_seconds)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # -- the form -----------------------------------------------------------------------------------------------
    @app.get("/api/options")
    def options() -> dict[str, Any]:
        return forms.option_schema()

    @app.post("/api/validate")
    async def validate(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        return {"error": forms.check_field(str(body.get("name")), body.get("value"))}

    @app.get("/api/files")
    def files() -> dict[str, Any]:
        return {"root": str(root), "data": forms.data_files(root), "models": forms.model_folders(root)}

    @app.post("/api/preview")
    async def preview(request: Request) -> Any:
        body = await json_body(request)
        model, data = confine.check(body.get("model") or ""), confine.check(body.get("data") or "")
        result = await asyncio.to_thread(forms.preview_rows, model, data, body.get("formatter") or None,
                                         body.get("technique") or "lora", _options(body))
        return result

    @app.post("/api/advise")
    async def advise(request: Request) -> Any:
        body = await json_body(request)
        model = confine.check(body.get("model") or "")
        rows, data = None, "train.jsonl"
        if body.get("data"):
            from finetune_sdk.data.rows import load_rows

            data = str(confine.check(body["data"]))
            rows = len(load_rows(data))
        return await asyncio.to_thread(forms.advice_for, model, body.get("technique") or "lora",
                                       body.get("quantizer") or None, _options(body), rows, data)

    # -- the registry -------------------------------------------------------------------------------------------
    from finetune_sdk.studio import registry_view

    @app.get("/api/registry")
    def registry() -> dict[str, Any]:
        return registry_view.overview(home, folder)

    @app.post("/api/registry/alias")
    async def set_alias(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        return registry_view.set_alias(home, str(body.get("ref") or ""), str(body.get("alias") or ""))

    @app.post("/api/registry/verify")
    async def verify(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        return await asyncio.to_thread(registry_view.verify, home, str(body.get("ref") or ""))

    from finetune_sdk.studio.loop_routes import add_loop_routes

    app.state.token = token
    add_loop_routes(app, folder=folder, root=root, home=home, confine=confine)
    return app
