"""Start-up cost: ``finetune --help`` and ``finetune plugins`` against ``python -c pass``, and what discovering
three installed third-party plugins adds to ``finetune plugins``.

The three plugins (examples/plugins/finetune-sdk-dora, examples/plugins/finetune-sdk-sharegpt and a package
written by ``finetune plugins init``) are pip-installed into a temporary folder put on PYTHONPATH. Each command runs
``--runs`` times in a fresh interpreter, alternating; the table shows medians.

    python benchmarks/bench_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import sys; from finetune_sdk.cli.main import cli; cli.main(args=['plugins', '--json'], "
         "prog_name='finetune', standalone_mode=False); "
         "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules),"
         " file=sys.stderr)")


def install_plugins(target: Path) -> None:
    from finetune_sdk.cli.plugin_scaffold import scaffold

    scaffold_root = scaffold("bench-formatter", "formatter", target.parent)
    folders = [ROOT / "examples/plugins/finetune-sdk-dora", ROOT / "examples/plugins/finetune-sdk-sharegpt",
               scaffold_root]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), *map(str, folders)], check=True)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    target = work / "site"
    install_plugins(target)
    base_env = {**os.environ, "FINETUNE_SDK_REGISTRY": str(work / "registry")}
    builtins_only = {**base_env, "FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD": "1"}
    with_plugins = {**base_env, "FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD": "0",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    finetune = [sys.executable, "-m", "finetune_sdk"]
    cases = {
        "python -c pass": ([sys.executable, "-c", "pass"], base_env),
        "finetune --help": (finetune + ["--help"], builtins_only),
        "finetune plugins (builtins only)": (finetune + ["plugins"], builtins_only),
        "finetune plugins (+3 plugins)": (finetune + ["plugins"], with_plugins),
        "finetune registry list": (finetune + ["registry", "list"], builtins_only),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, (cmd, env) in cases.items():
            times[name].append(timed(cmd, env))
    probe = subprocess.run([sys.executable, "-c", PROBE], env=with_plugins, capture_output=True, text=True)
    listed = [n for n in ("dora", "sharegpt", "bench-formatter") if f'"name": "{n}"' in probe.stdout]
    heavy = probe.stderr.strip().splitlines()[-1]

    base = statistics.median(times["python -c pass"])
    print(f"\nstart-up, median of {args.runs} runs each ({os.cpu_count()} CPU cores, Python "
          f"{sys.version.split()[0]})")
    print(f"{'command':36}{'median ms':>12}{'x python -c pass':>20}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:36}{median * 1000:>12.1f}{median / base:>20.2f}")
    added = statistics.median(times["finetune plugins (+3 plugins)"]) - statistics.median(
        times["finetune plugins (builtins only)"])
    print(f"\ndiscovering 3 third-party plugins adds {added * 1000:.1f} ms to `finetune plugins` "
          f"(listed: {', '.join(listed)}); modules imported: {heavy}")


if __name__ == "__main__":
    main()
