"""``finetune federated server/client`` and ``finetune advise --private-data``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from finetune_sdk.cli.main import cli
from tests.federated_data import write_clients


@pytest.mark.parametrize("args, message", [
    (["federated", "server", "-m", "x", "-o", "out", "--address", "nowhere"], "is not HOST:PORT"),
    (["federated", "server", "-m", "x", "-o", "out"], "needs TLS"),
    (["federated", "client", "--server", "127.0.0.1:1", "--data", "{data}"], "needs --root-certificates"),
    (["federated", "client", "--server", "127.0.0.1:1", "--data", "{bad}", "--insecure"], "line 1"),
    (["federated", "client", "--server", "127.0.0.1:1", "--data", "{data}", "--insecure", "--auth-key", "{data}"],
     "--auth-key needs TLS"),
    (["federated", "client", "--server", "127.0.0.1:1", "--data", "{data}", "--root-certificates", "{data}",
      "--auth-key", "{data}"], "not an unencrypted OpenSSH private key"),
    (["federated", "server", "-m", "x", "-o", "out", "--insecure", "--enable-supernode-auth"],
     "SuperNode authentication needs TLS"),
    (["federated", "server", "-m", "x", "-o", "out", "--insecure", "--supernode-public-key", "{data}"],
     "SuperNode authentication needs TLS"),
    (["federated", "server", "-m", "x", "-o", "out", "--ssl-certfile", "{data}", "--ssl-keyfile", "{data}",
      "--ssl-ca-certfile", "{data}", "--supernode-public-key", "{data}"], "not an OpenSSH public key"),
    (["federated", "server", "-m", "x", "-o", "out", "--insecure", "--secure-aggregation", "--dp", "server",
      "--clipping-norm", "1"], "only sees the sum of the updates"),
    (["federated", "server", "-m", "x", "-o", "out", "--insecure", "--secure-aggregation", "--secagg-num-shares",
      "many"], "--secagg-num-shares must be a count"),
    (["federated", "server", "-m", "x", "-o", "out", "--insecure", "--strategy-option", "eta"],
     "--strategy-option must be KEY=NUMBER"),
    (["federated", "server", "-m", "x", "-o", "out", "--insecure", "--update-compression", "int8",
      "--secure-aggregation"], "update_compression can't be combined with secure_aggregation"),
])
def test_bad_federated_input_is_one_line_exit_2(args, message, tmp_path):
    (tmp_path / "ok.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    args = [a.format(data=tmp_path / "ok.jsonl", bad=tmp_path / "bad.jsonl") for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_federated_help_imports_no_torch():
    probe = ("import sys\nfrom finetune_sdk.cli.main import cli\n"
             "try:\n    cli.main(args=['federated', 'server', '--help'], prog_name='finetune', standalone_mode=False)\n"
             "finally:\n    print(','.join(m for m in ('torch', 'transformers', 'flwr') if m in sys.modules),"
             " file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    assert "--min-clients" in proc.stdout and "--ssl-certfile" in proc.stdout


def test_advise_recommends_federated_when_data_cannot_leave_its_owners(llama_dir):
    from finetune_sdk.advice.advisor import advise

    advice = advise(llama_dir, dataset_rows=300, memory_bytes=8 * 2**30, device="cpu", data_owners=3)
    assert advice.federated and advice.as_dict()["federated"]
    text = " ".join(advice.reasons)
    assert "3 owners" in text and "only the adapter" in text and "differential privacy" in text
    assert advice.command("m").startswith("finetune federated server")
    assert not advise(llama_dir, dataset_rows=300, memory_bytes=8 * 2**30, device="cpu").federated
    result = CliRunner().invoke(cli, ["advise", str(llama_dir), "--rows", "300", "--memory", "8GiB",
                                      "--private-data", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["federated"] is True


FINETUNE = [sys.executable, "-m", "finetune_sdk"]


def _wait_for_text(path, text, process, timeout=300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        assert process.poll() is None, path.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.slow
def test_server_and_clients_as_separate_commands_over_tls_with_supernode_auth(llama_dir, tmp_path):
    """The deployment path: `finetune federated server` and `finetune federated client` processes, with the TLS
    settings and Flower's SuperNode authentication passed through: the server registers the clients' public keys
    with Flower; a client whose key was not registered is refused, the registered ones join."""
    pytest.importorskip("flwr")
    from finetune_sdk.federated.runtime import free_port
    from tests.federated_tls import write_supernode_keys, write_tls_files

    tls = write_tls_files(tmp_path / "tls")
    keys = write_supernode_keys(tmp_path / "keys", ["clinic-a", "clinic-b", "intruder"])
    clients = write_clients(tmp_path / "data", ["clinic-a", "clinic-b"])
    port = free_port()
    env = {**os.environ, "FINETUNE_SDK_REGISTRY": str(tmp_path / "registry")}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(FINETUNE + [
            "federated", "server", "-m", str(llama_dir), "-f", "chatml", "-o", str(tmp_path / "fed"),
            "--address", f"127.0.0.1:{port}", "--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["key"],
            "--ssl-ca-certfile", tls["ca"], "--supernode-public-key", keys["clinic-a"]["public"],
            "--supernode-public-key", keys["clinic-b"]["public"], "--fraction-evaluate", "0", "--rounds", "1",
            "--local-steps", "2", "--min-clients", "2", "--learning-rate", "0.03", "--publish", "clinics"],
            stdout=out, stderr=subprocess.STDOUT, env=env)

    def client(name, key):
        return FINETUNE + ["federated", "client", "--server", f"127.0.0.1:{port}", "--root-certificates", tls["ca"],
                           "--data", clients["clinic-a"]["train"], "--name", name, "--auth-key", key]

    workers = []
    try:
        _wait_for_text(log, "federated run:", server)  # keys registered, run submitted
        intruder = subprocess.run(client("intruder", keys["intruder"]["private"]), capture_output=True, text=True,
                                  env=env, timeout=300)
        refusal = intruder.stdout + intruder.stderr
        assert intruder.returncode == 1 and "Exit Code: 305" in refusal and "SuperNode stopped" in refusal, refusal
        for name, spec in clients.items():
            args = client(name, keys[name]["private"])
            args[args.index("--data") + 1] = spec["train"]
            workers.append(subprocess.Popen(args + ["--eval-data", spec["eval"]], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, env=env))
        server.wait(timeout=900)
    finally:
        for process in [server, *workers]:
            process.terminate()
            process.wait(60)
    output = log.read_text()
    assert server.returncode == 0, output[-3000:]
    manifest = json.loads((tmp_path / "fed" / "finetune_manifest.json").read_text())
    assert sorted(manifest["federated"]["history"][0]["clients"]) == ["clinic-a", "clinic-b"]
    assert output.count("registered SuperNode public key") == 2
    assert manifest["federated"]["history"][0]["version"] == "clinics@1"


@pytest.mark.slow
def test_server_killed_mid_run_resumes_through_the_cli(llama_dir, tmp_path):
    """`finetune federated server` is killed (with its SuperLink and ServerApp) after round 1; the same command
    with --resume continues at round 2 with the clients that stayed up, and round 1 is not run again.

    The clients are warm (the default): one long-lived ClientApp process per client serves both server runs; the
    executor of clinic-b, killed before the server starts, is started again by its `finetune federated client`
    (without that, clinic-b's SuperNode would take tasks that nothing runs and clinic-b would miss both rounds)."""
    pytest.importorskip("flwr")
    import psutil

    from finetune_sdk.federated.audit import AUDIT_ENV, opened_paths
    from finetune_sdk.federated.runtime import _signal_tree, free_port
    from finetune_sdk.federated.warm_client import STALE_TASK_VARIABLE

    clients = write_clients(tmp_path / "data", ["clinic-a", "clinic-b"])
    port = free_port()
    server_args = FINETUNE + ["federated", "server", "-m", str(llama_dir), "-f", "chatml", "-o", str(tmp_path / "fed"),
                              "--address", f"127.0.0.1:{port}", "--insecure", "--rounds", "2", "--local-steps", "1",
                              "--min-clients", "2", "--fraction-evaluate", "0", "--round-timeout", "300",
                              "--learning-rate", "0.03"]
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in clients}
    workers = [subprocess.Popen(FINETUNE + ["federated", "client", "--server", f"127.0.0.1:{port}", "--insecure",
                                            "--data", spec["train"], "--name", name],
                                stdout=logs[name], stderr=subprocess.STDOUT,
                                env={**os.environ, AUDIT_ENV: str(tmp_path / "audit"),
                                     STALE_TASK_VARIABLE: "20"})  # a dropped message: 20 s, not 60
               for name, spec in clients.items()]
    state = tmp_path / "fed.federated" / "checkpoint" / "state.json"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (executors := [
                child for child in psutil.Process(workers[1].pid).children(recursive=True)
                if "finetune_sdk.federated.warm_client" in " ".join(child.cmdline())]):
            time.sleep(0.2)
        assert len(executors) == 1
        executors[0].kill()  # clinic-b's idle ClientApp executor dies; its client starts another
        with open(tmp_path / "first.log", "wb") as out:
            first = subprocess.Popen(server_args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not state.is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        _signal_tree(first.pid, signal.SIGKILL)  # the server machine dies: CLI, SuperLink and ServerApp
        first.wait(60)
        saved = json.loads(state.read_text())
        assert saved["round"] == 1 and not (tmp_path / "fed").exists()

        resumed = subprocess.run(server_args + ["--resume"], capture_output=True, text=True, timeout=900)
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(60)
        for log in logs.values():
            log.close()
    told = "".join(f"\n--- {name} ---\n" + (tmp_path / f"{name}.log").read_text()[-4000:] for name in clients)
    told += "\n--- first server run ---\n" + (tmp_path / "first.log").read_text()[-3000:]
    told += "\n--- resumed server run ---\n" + resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.returncode == 0, told
    history = json.loads((tmp_path / "fed" / "finetune_manifest.json").read_text())["federated"]["history"]
    assert [entry["round"] for entry in history] == [1, 2], told
    assert history[0] == saved["history"][0]  # round 1 as checkpointed, not run again
    assert sorted(history[0]["clients"]) == sorted(history[1]["clients"]) == ["clinic-a", "clinic-b"], told
    assert not state.exists()
    for name in clients:  # one ClientApp process served both server runs (clinic-b's: the executor started again)
        assert len(opened_paths(tmp_path / "audit", f"client-{name}")) == 1, name


@pytest.mark.slow
def test_sigterm_stops_the_server_and_the_flower_processes_it_started(llama_dir, tmp_path):
    pytest.importorskip("flwr")
    import psutil

    from finetune_sdk.federated.runtime import free_port

    server = subprocess.Popen(FINETUNE + ["federated", "server", "-m", str(llama_dir), "-f", "chatml", "-o",
                                          str(tmp_path / "fed"), "--address", f"127.0.0.1:{free_port()}",
                                          "--insecure", "--min-clients", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    children: list = []
    while time.time() < deadline and not any("flwr-serverapp" in " ".join(c.cmdline()) for c in children):
        time.sleep(0.5)  # until the run is submitted: the SuperLink has started its ServerApp
        children = [c for c in psutil.Process(server.pid).children(recursive=True) if c.is_running()]
    assert children, "the server never started its SuperLink"
    server.terminate()
    server.wait(60)
    gone, alive = psutil.wait_procs(children, timeout=30)
    left = [" ".join(p.cmdline())[:100] for p in alive]
    for process in alive:  # don't leave them running when the test fails
        process.kill()
    assert left == []
