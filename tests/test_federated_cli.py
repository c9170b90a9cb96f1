"""``finetune federated server/client`` and ``finetune advise --private-data``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from finetune_sdk.cli.main import cli
from tests.federated_data import write_clients


@pytest.mark.parametrize("args, message", [
    (["federated", "server", "-m", "x", "-o", "out", "--address", "nowhere"], "is not HOST:PORT"),
    (["federated", "server", "-m", "x", "-o", "out"], "needs TLS"),
    (["federated", "client", "--server", "127.0.0.1:1", "--data", "{data}"], "needs --root-certificates"),
    (["federated", "client", "--server", "127.0.0.1:1", "--data", "{bad}", "--insecure"], "line 1"),
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
    from finetune_sdk.advisor import advise

    advice = advise(llama_dir, dataset_rows=300, memory_bytes=8 * 2**30, device="cpu", data_owners=3)
    assert advice.federated and advice.as_dict()["federated"]
    text = " ".join(advice.reasons)
    assert "3 owners" in text and "only the adapter" in text and "differential privacy" in text
    assert advice.command("m").startswith("finetune federated server")
    assert not advise(llama_dir, dataset_rows=300, memory_bytes=8 * 2**30, device="cpu").federated
    result = CliRunner().invoke(cli, ["advise", str(llama_dir), "--rows", "300", "--memory", "8GiB",
                                      "--private-data", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["federated"] is True


@pytest.mark.slow
def test_server_and_clients_as_separate_commands_over_tls(llama_dir, tmp_path):
    """The deployment path: `finetune federated server` and two `finetune federated client` processes, with the
    TLS settings passed through to Flower's SuperLink and SuperNodes."""
    pytest.importorskip("flwr")
    from finetune_sdk.federated.runtime import free_port
    from tests.federated_tls import write_tls_files

    tls = write_tls_files(tmp_path / "tls")
    clients = write_clients(tmp_path / "data", ["clinic-a", "clinic-b"])
    port = free_port()
    env = {**os.environ, "FINETUNE_SDK_REGISTRY": str(tmp_path / "registry")}
    finetune = [sys.executable, "-m", "finetune_sdk"]
    server = subprocess.Popen(finetune + ["federated", "server", "-m", str(llama_dir), "-f", "chatml", "-o",
                                          str(tmp_path / "fed"), "--address", f"127.0.0.1:{port}",
                                          "--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["key"],
                                          "--ssl-ca-certfile", tls["ca"], "--fraction-evaluate", "0",
                                          "--rounds", "1", "--local-steps", "2", "--min-clients", "2",
                                          "--learning-rate", "0.03", "--publish", "clinics"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    workers = [subprocess.Popen(finetune + ["federated", "client", "--server", f"127.0.0.1:{port}",
                                            "--root-certificates", tls["ca"],
                                            "--data", spec["train"], "--eval-data", spec["eval"], "--name", name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
               for name, spec in clients.items()]
    try:
        output, _ = server.communicate(timeout=900)
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(60)
    assert server.returncode == 0, output
    manifest = json.loads((tmp_path / "fed" / "finetune_manifest.json").read_text())
    assert sorted(manifest["federated"]["history"][0]["clients"]) == ["clinic-a", "clinic-b"]
    assert "clinics@1" in output or manifest["federated"]["history"][0]["version"] == "clinics@1"
