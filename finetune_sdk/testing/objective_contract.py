"""The contract every training objective passes, builtin or a plugin's (``register_objectives``): gradient
accumulation equals the bigger batch, a resumed run ends with the uninterrupted run's weights, the reference after
an SFT stage is the SFT result, and bad input is refused in one line before any model loads.

An objective's statistics of a batch (a mean's normaliser, KTO's KL reference point, GRPO's sampled groups and
their advantages) must be those of the optimizer step's whole batch, so that ``per_device_train_batch_size=b``
with ``gradient_accumulation_steps=k`` trains exactly as ``per_device_train_batch_size=k*b`` on the same rows:

    from finetune_sdk.testing import ObjectiveContract

    class TestMyObjective(ObjectiveContract):
        name = "my-objective"
        case = AccumulationCase("lora", "my-formatter", ROWS, {"learning_rate": 1e-2})

(``case`` defaults to :data:`BUILTIN_CASES` ``[name]``.) Each run builds a tiny float32 model in code and trains a
few steps on a CPU, offline; the row counts leave a shorter last step in each epoch, where a per-micro-batch mean
and the step's mean differ.

Tolerance: both runs are float32 and differ only in how the same sums are grouped (matmuls over batches of other
shapes, partial sums added in another order), so every logged value and every trained weight agrees to float32
rounding carried through a few optimizer steps: :attr:`ObjectiveContract.rtol` 1e-4 relative (float32's epsilon is
1.2e-7; Adam divides each update by the root of its second moment, which passes a relative gradient error through
unchanged, and a few steps on a tiny model grow it about tenfold) and :attr:`ObjectiveContract.atol` 1e-6 absolute
for values near 0. A batch-level statistic computed per micro-batch is off by percents (KTO's reference point,
before the fix: adapters 24% apart), far outside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from finetune_sdk.testing.tiny import save_tiny_model

WORDS = [("red", "colour"), ("cat", "animal"), ("blue", "colour"), ("dog", "animal"), ("fish", "animal"),
         ("green", "colour"), ("bird", "animal")]
#: Seven rows of uneven lengths: batch 4 gives steps of 4 and 3 rows, batch 2 x 2 micro-batches of 2, 2 | 2, 1.
CAUSAL_ROWS = [{"prompt": f"what is {w}?", "completion": f"{w} is a {c}" + "." * (i % 3 * 4)}
               for i, (w, c) in enumerate(WORDS)]
PREFERENCE_ROWS = [{"prompt": f"what is {w}?", "chosen": f"{w} is a {c}, thanks" + "!" * (i % 3), "rejected": f"{w}?"}
                   for i, (w, c) in enumerate(WORDS)]
KTO_ROWS = [{"prompt": f"what is {w}?", "completion": f"{w} is a {c}." if i % 2 else f"no idea about {w}",
             "label": bool(i % 2)} for i, (w, c) in enumerate(WORDS)]
CLASSIFICATION_ROWS = [{"text": f"the {w} is here" + " now" * (i % 3), "label": c} for i, (w, c) in enumerate(WORDS)]
PROMPT_ROWS = [{"prompt": f"name a {c} like {w}"} for w, c in WORDS]


def completion_length(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """A reward that varies within every group of a tiny random model's completions: the completion's length / 10."""
    return [len(completion) / 10 for completion in completions]


@dataclass(frozen=True)
class AccumulationCase:
    """What an objective trains on in the contract: the technique and formatter that select it, the rows and the
    options (added to the contract's float32, dropout-free, seeded defaults)."""

    technique: str
    formatter: str
    rows: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)


LORA = {"learning_rate": 0.5, "lora_dropout": 0.0, "target_modules": "all-linear"}
#: The contract's case for each builtin objective, and variants (``name/variant``) for options that change how
#: batches are formed (packing, cached features, a trained backbone).
BUILTIN_CASES: dict[str, AccumulationCase] = {
    "sft": AccumulationCase("lora", "chatml", CAUSAL_ROWS, LORA),
    "sft/no-packing": AccumulationCase("lora", "chatml", CAUSAL_ROWS, {**LORA, "packing": False}),
    "dpo": AccumulationCase("lora", "preference", PREFERENCE_ROWS, {**LORA, "beta": 0.5}),
    "orpo": AccumulationCase("lora", "preference", PREFERENCE_ROWS, {**LORA, "objective": "orpo", "beta": 0.5}),
    "simpo": AccumulationCase("lora", "preference", PREFERENCE_ROWS,
                              {**LORA, "objective": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.5}),
    "kto": AccumulationCase("lora", "kto", KTO_ROWS, {**LORA, "beta": 0.5}),
    "grpo": AccumulationCase("lora", "prompt", PROMPT_ROWS,
                             {**LORA, "reward_funcs": [completion_length], "num_generations": 4,
                              "max_completion_length": 6, "max_length": 64}),
    "classification-head": AccumulationCase("classifier", "classification", CLASSIFICATION_ROWS,
                                            {"learning_rate": 0.5}),
    "classification-head/no-cache": AccumulationCase("classifier", "classification", CLASSIFICATION_ROWS,
                                                     {"learning_rate": 0.5, "cache_features": False}),
    "reward-modeling": AccumulationCase("reward-model", "preference", PREFERENCE_ROWS,
                                        {"learning_rate": 0.5, "center_rewards_coefficient": 0.01}),
    "reward-modeling/lora": AccumulationCase("reward-model", "preference", PREFERENCE_ROWS,
                                             {**LORA, "backbone": "lora"}),
}
#: Parts of log keys that are not a statistic of the batch (time, speed).
UNCOMPARED_LOG_KEYS = ("runtime", "per_second", "seconds", "flos")


class ObjectiveContract:
    """Tests every objective passes. Set ``name`` (the objective); ``case`` when it is not a builtin one."""

    name: ClassVar[str]
    case: ClassVar[AccumulationCase | None] = None
    #: Micro-batch size ``b`` and accumulation steps ``k`` (the bigger batch is ``k*b``).
    batch_size: ClassVar[int] = 2
    accumulation_steps: ClassVar[int] = 2
    #: Float tolerance (see the module docstring for why these values).
    rtol: ClassVar[float] = 1e-4
    atol: ClassVar[float] = 1e-6

    def accumulation_case(self) -> AccumulationCase:
        return self.case or BUILTIN_CASES[self.name]

    @pytest.fixture(scope="class")
    def objective_model_dir(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return save_tiny_model(tmp_path_factory.mktemp("objective-model") / "llama", "llama")

    def fit(self, model_dir: Path, output_dir: Path, batch_size: int, accumulation_steps: int, *, resume: bool = False,
            **options: Any) -> Any:
        """One run of the case: float32, dropout off, SGD, seeded, two epochs, a log entry per optimizer step."""
        from finetune_sdk import Trainer

        case = self.accumulation_case()
        options = {"dtype": "float32", "bf16": False, "seed": 0, "num_train_epochs": 2, "logging_steps": 1,
                   "save_steps": 0, "optim": "sgd", **case.options, **options}
        trainer = Trainer(model_dir, technique=case.technique, formatter=case.formatter, output_dir=output_dir,
                          progress=False, per_device_train_batch_size=batch_size,
                          gradient_accumulation_steps=accumulation_steps, **options)
        return trainer.fit([dict(row) for row in case.rows], resume=resume)

    def test_accumulation_equals_bigger_batch(self, objective_model_dir: Path, tmp_path: Path) -> None:
        """Batch ``k*b`` and batch ``b`` with ``k`` accumulation steps: the same logged values at every optimizer
        step (loss, gradient norm, the objective's statistics) and the same trained weights (their updates compared
        against the update of the bigger batch, from a run with ``learning_rate=0``)."""
        b, k = self.batch_size, self.accumulation_steps
        bigger = self.fit(objective_model_dir, tmp_path / "bigger", k * b, 1)
        accumulated = self.fit(objective_model_dir, tmp_path / "accumulated", b, k)
        start = self.fit(objective_model_dir, tmp_path / "start", k * b, 1, learning_rate=0.0, num_train_epochs=1)
        assert bigger.manifest["objective"] == accumulated.manifest["objective"] == self.name.split("/")[0]
        seen = assert_same_training(bigger, accumulated, self.rtol, self.atol, start=start)
        print(f"{self.name}: largest relative difference {seen['logs']:.2e} in the logs, {seen['weights']:.2e} in "
              "the weight updates")


    def test_resume_ends_with_the_uninterrupted_weights(self, objective_model_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        """A run that fails after a checkpoint and is resumed (``resume=True``) ends with the weights of the run
        that never failed (the objective's state between steps, e.g. a reference, survives)."""
        from finetune_sdk.training.callbacks import CrashAtStep

        def crash(callback: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == callback.step:
                raise RuntimeError("crash for the resume contract")

        steps = {"max_steps": 4, "save_steps": 2, "num_train_epochs": 1}
        whole = self.fit(objective_model_dir, tmp_path / "whole", self.batch_size, 1, **steps)
        monkeypatch.setattr(CrashAtStep, "on_step_end", crash)
        monkeypatch.setenv("FINETUNE_SDK_CRASH_AT_STEP", "3")
        with pytest.raises(RuntimeError, match="crash for the resume contract"):
            self.fit(objective_model_dir, tmp_path / "resumed", self.batch_size, 1, **steps)
        monkeypatch.delenv("FINETUNE_SDK_CRASH_AT_STEP")
        resumed = self.fit(objective_model_dir, tmp_path / "resumed", self.batch_size, 1, resume=True, **steps)
        assert resumed.metrics["train_steps"] == whole.metrics["train_steps"] == 4
        weights, again = result_weights(whole.output_dir), result_weights(resumed.output_dir)
        assert weights.keys() == again.keys() and weights
        for name, tensor in weights.items():
            assert (again[name] - tensor).abs().max().item() <= self.atol + self.rtol * tensor.abs().max().item(), name

    def test_reference_after_sft_is_the_sft_result(self, objective_model_dir: Path, tmp_path: Path) -> None:
        """``fit([Stage(sft), Stage(objective)])``: an objective whose reference is the policy as it stands when it
        starts (``loss_at_reference`` declared) starts at exactly that loss after a trained SFT stage."""
        from finetune_sdk import Stage, Trainer
        from finetune_sdk.objectives import get_objective, resolve_objective_options

        case = self.accumulation_case()
        objective = get_objective(self.name.split("/")[0])
        stage_options = {k: v for k, v in case.options.items() if k in objective.option_specs() or k == "objective"}
        expected = objective.loss_at_reference(resolve_objective_options(
            objective, {k: v for k, v in stage_options.items() if k != "objective"}))
        if expected is None or case.technique not in ("lora", "full", "qlora"):
            pytest.skip(f"objective {objective.name!r} declares no loss at its reference")
        options = {"dtype": "float32", "bf16": False, "seed": 0, "logging_steps": 1, "save_steps": 0,
                   **{k: v for k, v in case.options.items() if k not in objective.option_specs() and k != "objective"}}
        sft_rows = [{"prompt": row.get("prompt", "q"), "completion": "a short answer."} for row in case.rows]
        trainer = Trainer(objective_model_dir, technique=case.technique, output_dir=tmp_path / "stages",
                          progress=False, **options)
        result = trainer.fit([Stage(sft_rows, formatter="chatml", num_train_epochs=2),
                              Stage([dict(r) for r in case.rows], formatter=case.formatter, learning_rate=0.0,
                                    max_steps=1, **stage_options)])
        first = next(entry["loss"] for entry in result.log_history if "loss" in entry)
        assert first == pytest.approx(expected, rel=self.rtol, abs=self.atol)

    def test_bad_input_is_one_line_before_loading(self, objective_model_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        """Each of the objective's options out of its range, an option no objective takes, and this objective on
        rows of another task: one :class:`~finetune_sdk.errors.ConfigError` line naming it, nothing loaded or
        written."""
        from finetune_sdk import Trainer
        from finetune_sdk.errors import ConfigError, FinetuneError
        from finetune_sdk.objectives import get_objective

        import finetune_sdk.models.sources as models

        monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
        case = self.accumulation_case()
        objective = get_objective(self.name.split("/")[0])
        out = tmp_path / "out"
        for option in objective.options:
            bad = _out_of_range(option)
            if bad is None:
                continue
            with pytest.raises(ConfigError) as caught:
                Trainer(objective_model_dir, technique=case.technique, output_dir=out, progress=False,
                        objective=objective.name, **{option.name: bad})
            assert option.name in str(caught.value) and "\n" not in str(caught.value)
        with pytest.raises(ConfigError, match="unknown option 'no_such_option'"):
            Trainer(objective_model_dir, technique=case.technique, output_dir=out, progress=False,
                    objective=objective.name, no_such_option=1)
        other = [{"text": "plain text with no answer column"}] * 2
        if "causal-lm" in objective.technique_tasks and "causal-lm" not in objective.formatter_tasks:
            trainer = Trainer(objective_model_dir, technique=case.technique, output_dir=out, progress=False,
                              objective=objective.name)
            with pytest.raises(FinetuneError) as caught:
                trainer.fit(other)
            assert objective.name in str(caught.value) and "\n" not in str(caught.value)
        assert not out.exists()


def _out_of_range(option: Any) -> Any:
    """A value outside ``option``'s declared range (None: it declares none)."""
    if option.type not in (int, float):
        return None
    if option.minimum is not None:
        return option.minimum - 1
    if option.exclusive_minimum is not None:
        return option.exclusive_minimum
    if option.maximum is not None:
        return option.maximum + 1
    if option.exclusive_maximum is not None:
        return option.exclusive_maximum
    return None


def assert_same_training(bigger: Any, accumulated: Any, rtol: float = 1e-4, atol: float = 1e-6,
                         start: Any = None) -> dict[str, float]:
    """Two :class:`~finetune_sdk.FitResult` trained alike: the same logged values at every optimizer step (loss,
    gradient norm, learning rate, the objective's statistics), the same ``train_loss`` and the same weights in every
    ``.safetensors`` file of their folders. Values agree within ``rtol`` relative plus ``atol``; a weight tensor
    within ``rtol`` of the largest magnitude of its update from ``start`` (the untrained result), or of the tensor
    itself without ``start``, plus ``atol``. Returns the largest relative differences seen (``logs``, ``weights``)."""
    big_logs, acc_logs = step_logs(bigger), step_logs(accumulated)
    assert [e["step"] for e in acc_logs] == [e["step"] for e in big_logs] and len(big_logs) >= 2
    seen = {"logs": 0.0, "weights": 0.0}
    for big, acc in zip(big_logs, acc_logs):
        assert acc.keys() == big.keys(), (big, acc)
        for key in sorted(big):
            seen["logs"] = max(seen["logs"], abs(acc[key] - big[key]) / max(abs(big[key]), atol))
            assert math.isclose(acc[key], big[key], rel_tol=rtol, abs_tol=atol), \
                f"step {big['step']:.0f}: {key} {acc[key]!r} with accumulation, {big[key]!r} in one batch"
    assert accumulated.metrics["train_loss"] == pytest.approx(bigger.metrics["train_loss"], rel=rtol, abs=atol)
    big_weights, acc_weights = result_weights(bigger.output_dir), result_weights(accumulated.output_dir)
    start_weights = result_weights(start.output_dir) if start is not None else None
    assert big_weights and big_weights.keys() == acc_weights.keys()
    for name, weight in big_weights.items():
        reference = weight - start_weights[name] if start_weights is not None else weight
        scale = reference.abs().max().item()
        difference = (acc_weights[name] - weight).abs().max().item()
        seen["weights"] = max(seen["weights"], difference / max(scale, atol))
        assert difference <= atol + rtol * scale, f"{name}: max difference {difference:.3g} > {atol + rtol * scale:.3g}"
    return seen


def step_logs(result: Any) -> list[dict[str, float]]:
    """The numeric values of each training log entry (one per optimizer step with ``logging_steps=1``)."""
    return [{k: float(v) for k, v in entry.items()
             if isinstance(v, (int, float)) and not any(part in k for part in UNCOMPARED_LOG_KEYS)}
            for entry in result.log_history if "loss" in entry]


def result_weights(folder: Path) -> dict[str, Any]:
    """Every tensor of every ``.safetensors`` file in a result folder, as ``{"file:tensor": float32 tensor}``."""
    from safetensors.torch import load_file

    return {f"{path.name}:{name}": tensor.float() for path in sorted(Path(folder).rglob("*.safetensors"))
            for name, tensor in load_file(str(path)).items()}
