"""Test set-up: offline, seeded, no network beyond loopback, tiny models built in code."""

from __future__ import annotations

import os
import socket
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD"] = os.environ.get("FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("FINETUNE_SDK_CACHE", tempfile.mkdtemp(prefix="finetune-sdk-test-cache-"))

import pytest  # noqa: E402

_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address: object) -> object:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and self.family in (socket.AF_INET, socket.AF_INET6) and \
            not (host.startswith("127.") or host in ("::1", "localhost")):
        raise OSError(f"test tried to reach {host}: tests are offline (loopback only)")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only  # a stray download fails loudly instead of hanging


@pytest.fixture(autouse=True)
def _seed_and_fresh_plugins():
    """Every test starts from the same seeds and a freshly loaded plugin host."""
    import random

    from finetune_sdk.plugin_manager import reset_plugins

    random.seed(0)
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Saved tiny model folders by family, built once per session."""
    from finetune_sdk.testing.tiny import save_tiny_model

    cache: dict[str, object] = {}

    def get(family: str = "llama", **config):
        key = family + repr(sorted(config.items()))
        if key not in cache:
            cache[key] = save_tiny_model(tmp_path_factory.mktemp(family), family, **config)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def dp_federated_run(tmp_path_factory):
    """A real federated result with differential privacy on (``tests/studio_federated.py``), trained once per
    session: ``(result folder, final manifest)``. The folder is ``<root>/runs/fed`` in a root of its own (with the
    tiny base in ``<root>/model``); the studio's rounds view (test_studio_loop) and its page
    (test_studio_loop_browser) read this one run. Read it, or copy it: never write into it."""
    from finetune_sdk.testing.tiny import save_tiny_model
    from tests.studio_federated import run_dp_federation

    root = tmp_path_factory.mktemp("dp-federation")
    save_tiny_model(root / "model")
    manifest = run_dp_federation(root / "model", root / "runs" / "fed", root / "data")
    return root / "runs" / "fed", manifest


@pytest.fixture
def llama_dir(tiny_models):
    return tiny_models("llama")


@pytest.fixture
def qa_rows():
    return [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
            for a in range(4) for b in range(4)]


@pytest.fixture
def hub_online(monkeypatch):
    """Lift offline mode for a test that talks to the local Hub-protocol test server (loopback only)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture
def install(monkeypatch):
    """Install fake entry points and make them the process's plugins: ``install(ep1, ep2) -> PluginHost``."""
    from finetune_sdk import plugin_manager
    from finetune_sdk.plugin_manager import PluginHost

    def _install(*entry_points):
        monkeypatch.setattr(plugin_manager, "discover_entry_points", lambda: list(entry_points))
        host = PluginHost(autoload=True)
        monkeypatch.setattr(plugin_manager, "_HOST", host)
        return host

    return _install


#: The longest test files, longest first (``--durations`` of `make test`, docs/benchmarks.md "The test suite"): each
#: takes 1-5 minutes on one worker, so they start first and the short files fill the other worker meanwhile.
LONGEST_FILES = ("test_federated_runtime.py", "test_federated_warm.py", "test_federated_cli.py", "test_real_models.py",
                 "test_export_smollm2.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (:data:`LONGEST_FILES`), then the other files with slow tests, then the rest; each
    file's tests in their own order. With pytest-xdist's ``--dist loadfile --no-loadscope-reorder``
    (scripts/test.sh) each file goes to one worker in this order, so no worker is left running a real-model file
    alone at the end. (Without ``--no-loadscope-reorder`` xdist hands out the files with the most tests first, which
    put the one- and two-test real-model files last.)"""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.path.name
        return (LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES),
                item.path not in slow_files)

    items.sort(key=rank)  # stable: the order within each file is kept
