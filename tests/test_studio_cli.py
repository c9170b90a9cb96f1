"""``finetune studio``: the install hint without the extra, loopback and one URL with a fresh token, the warning
for another host."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from finetune_sdk.cli.main import cli


def test_without_the_extra_it_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = CliRunner().invoke(cli, ["studio"])
    assert result.exit_code == 2
    assert result.output.strip() == ("Error: finetune studio needs the 'studio' extra: pip install "
                                     "'finetune-sdk[studio]' (fastapi, uvicorn); missing: uvicorn")


@pytest.fixture
def served(monkeypatch, tmp_path):
    pytest.importorskip("uvicorn")
    import uvicorn

    import finetune_sdk.studio as studio

    configs = []
    real_bind = studio.bind_socket
    # the default port may be taken on a shared machine: bind a free one (the URL still names the port asked for)
    monkeypatch.setattr(studio, "bind_socket", lambda host, port: real_bind(host, 0))

    def run(self, sockets=None):
        configs.append(self.config)
        for bound in sockets or []:
            bound.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.chdir(tmp_path)
    return configs


def test_it_binds_loopback_and_prints_one_url_with_a_fresh_token(served, tmp_path, caplog):
    first = CliRunner().invoke(cli, ["studio", "--runs", "runs", "--port", "0"])
    second = CliRunner().invoke(cli, ["studio", "--runs", "runs"])
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    (line,) = [x for x in first.output.splitlines() if x.startswith("finetune studio: ")]
    url = line.split(": ", 1)[1]
    assert url.startswith("http://127.0.0.1:") and "/?token=" in url
    token = url.split("token=")[1]
    assert len(token) == 43 and token not in second.output  # secrets.token_urlsafe(32), new each time
    assert served[0].host == "127.0.0.1" and served[0].port > 0 and served[0].access_log is False
    assert served[1].port == 8765 and (tmp_path / "runs").is_dir()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_another_host_is_warned_about_and_still_needs_the_token(served, caplog):
    with caplog.at_level(logging.WARNING, logger="finetune_sdk"):
        result = CliRunner().invoke(cli, ["studio", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 0 and "?token=" in result.output
    assert any("other machines can reach it" in r.getMessage() for r in caplog.records)
    from fastapi.testclient import TestClient

    assert TestClient(served[0].app).get("/api/runs").status_code == 401


def test_a_runs_path_that_is_a_file_is_refused(served, tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    result = CliRunner().invoke(cli, ["studio", "--runs", "runs"])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output


def test_the_applications_logging_handlers_survive_the_studio(served):
    """uvicorn's default log config goes through ``logging.config.dictConfig``, which closes every handler of the
    process: an application's log file, or (seen under pytest-xdist) a handler writing to pytest's captured
    stderr, whose file then broke every later test. The studio gives uvicorn no log config."""
    closed = []

    class Recording(logging.Handler):
        def emit(self, record):
            pass

        def close(self):
            closed.append(self)
            super().close()

    handler = Recording()
    logging.getLogger().addHandler(handler)
    try:
        result = CliRunner().invoke(cli, ["studio", "--port", "0"])
        assert result.exit_code == 0, result.output
        assert closed == [] and handler in logging.getLogger().handlers
        assert logging.getLogger("uvicorn.error").level == logging.WARNING  # uvicorn's own level still set
    finally:
        logging.getLogger().removeHandler(handler)
