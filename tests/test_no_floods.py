"""Fit and load of every builtin technique print no line once per step and no dependency's deprecation warning."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, warnings
    from pathlib import Path
    import finetune_sdk
    from finetune_sdk import Trainer
    from finetune_sdk.testing.tiny import save_tiny_model

    tmp = Path(sys.argv[1])
    model = save_tiny_model(tmp / "model")
    qa = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a + b}"} for a in range(4) for b in range(4)]
    labelled = [{"text": f"item number {i}", "label": "odd" if i % 2 else "even"} for i in range(16)]
    for technique in ("lora", "qlora", "full", "classifier"):
        rows = labelled if technique == "classifier" else qa
        result = Trainer(model, technique=technique, output_dir=tmp / technique, max_steps=STEPS, logging_steps=1,
                         per_device_train_batch_size=2, learning_rate=1e-3).fit(rows, eval_data=rows[:4])
        finetune_sdk.load(result.output_dir)
        print("finished", technique, flush=True)
""")
STEPS = 6


@pytest.mark.slow
def test_fit_and_load_of_each_technique_print_no_flood(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "always"}  # every warning, every time
    script = tmp_path / "fit_and_load.py"
    script.write_text(SCRIPT.replace("STEPS", str(STEPS)))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    output = proc.stdout + proc.stderr
    assert output.count("finished") == 4

    warnings = re.findall(r"^(\S+):\d+: (\w+Warning): (.*)$", output, flags=re.MULTILINE)
    third_party = [w for w in warnings if "finetune_sdk" not in w[0] and "finetune-sdk" not in w[0]]
    deprecations = [w for w in third_party if w[1] in ("DeprecationWarning", "FutureWarning",
                                                       "PendingDeprecationWarning")]
    assert not deprecations, deprecations

    # one line per training step is the SDK's own progress (each says its step); anything else repeating that
    # often is a flood
    counts = collections.Counter(line.strip() for line in output.splitlines() if line.strip())
    repeated = {line: n for line, n in counts.items() if n >= STEPS}
    assert not repeated, repeated
    steps_logged = [line for line in output.splitlines() if re.search(r"finetune_sdk: step \d+/6 ", line)]
    assert len(steps_logged) == 4 * STEPS  # the progress lines are there, with different content each step
    for step in ("loading model ...", "evaluating on 4 examples ...",
                 "classifier features: running the frozen backbone once ..."):  # the long steps say what they do
        assert f"finetune_sdk: {step}" in output, step
