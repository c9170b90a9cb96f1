"""Issue 15, KTO: unpaired thumbs up/down rows train with KTO (Ethayarajh et al., 2024) on lora, qlora and full."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from finetune_sdk import Stage, Trainer
from finetune_sdk.errors import DataError

#: Desirable: the right sum; undesirable: a refusal (both for every prompt, unpaired rows).
TRAIN = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}.", "label": True}
         for a in range(4) for b in range(4)] + \
        [{"prompt": f"what is {a} plus {b}?", "completion": f"I do not know {a} {b}.", "label": False}
         for a in range(4) for b in range(4)]
HELD_OUT = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}.", "label": True}
            for a, b in [(4, 1), (5, 2), (1, 5)]] + \
           [{"prompt": f"what is {a} plus {b}?", "completion": f"I do not know {a} {b}.", "label": False}
            for a, b in [(6, 0), (2, 5), (5, 5)]]
SFT = [{"instruction": f"what is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."}
       for a in range(3) for b in range(3)]
SETTINGS = {"lora": {"learning_rate": 2e-2, "target_modules": "all-linear", "r": 16},
            "qlora": {"learning_rate": 2e-2}, "full": {"learning_rate": 2e-3}}


def held_out_baseline(model_dir, technique, options):
    """The held-out margin of the untrained policy, with the untrained policy as the reference: 0 by definition;
    and the raw log-prob margin of desirable over undesirable, to compare against after training."""
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.objectives.kto_training import encode_kto, evaluate_kto

    from finetune_sdk.objectives import get_objective, run_options

    options = run_options(get_objective("kto"), options)  # the Trainer's, with KTO's own resolved
    base = Trainer(model_dir, technique=technique, formatter="kto", progress=False).current_model()
    held = encode_kto(load_rows(HELD_OUT), base.formatter, base.tokenizer, options)
    return evaluate_kto(base.model, held, base.tokenizer.pad_token_id, options)


@pytest.mark.parametrize("technique", ["lora", "full", pytest.param("qlora", marks=pytest.mark.slow)])
def test_kto_raises_the_held_out_margin_of_desirable_over_undesirable(tiny_models, tmp_path, technique):
    trainer = Trainer(tiny_models("llama"), technique=technique, formatter="kto", output_dir=tmp_path / "o",
                      num_train_epochs=2, beta=0.5, save_steps=0, progress=False, **SETTINGS[technique])
    result = trainer.fit(TRAIN, eval_data=HELD_OUT)
    m = result.metrics
    assert result.manifest["objective"] == "kto" and result.manifest["formatter"] == "kto"
    assert held_out_baseline(tiny_models("llama"), technique, trainer.options)["kto_margin"] == 0.0
    assert m["kto_margin"] > 1.0, m  # log pi/pi_ref of desirable minus undesirable, in nats, on unseen prompts
    assert m["eval_loss"] < 0.45 and m["eval_rows_scored"] == 6 and m["eval_rows_skipped"] == 0, m
    logged = [entry for entry in result.log_history if "loss" in entry]
    assert logged and all("kto_kl" in entry and entry["kto_kl"] >= 0 for entry in logged)
    assert logged[-1]["kto_margin"] > 0  # training batches: desirable completions gained on undesirable ones


def test_a_policy_that_never_moves_has_margin_zero_and_the_loss_at_zero_log_ratios(tiny_models, tmp_path):
    rows = TRAIN[:16] + TRAIN[16:24]  # 16 desirable, 8 undesirable, all in one batch
    trainer = Trainer(tiny_models("llama"), technique="lora", formatter="kto", output_dir=tmp_path / "o",
                      learning_rate=0, max_steps=2, per_device_train_batch_size=24, save_steps=0, progress=False,
                      desirable_weight=1.0, undesirable_weight=1.5)
    result = trainer.fit(rows, eval_data=HELD_OUT)
    # r = 0 and z0 = 0: every row's loss is its weight * (1 - sigmoid(0)) = weight / 2
    assert result.metrics["kto_margin"] == pytest.approx(0.0, abs=1e-5)
    assert result.metrics["kto_kl"] == pytest.approx(0.0, abs=1e-5)
    assert result.metrics["eval_loss"] == pytest.approx((3 * 1.0 + 3 * 1.5) / 2 / 6, abs=1e-5)
    assert result.metrics["train_loss"] == pytest.approx((16 * 1.0 + 8 * 1.5) / 2 / 24, abs=1e-5)


def test_kto_after_sft_takes_the_sft_result_as_its_reference(tiny_models, tmp_path):
    result = Trainer(tiny_models("llama"), technique="lora", output_dir=tmp_path / "o", progress=False,
                     learning_rate=2e-2, save_steps=0, target_modules="all-linear").fit(
        [Stage(SFT, formatter="alpaca", max_steps=3),
         Stage(TRAIN, formatter="kto", eval_data=HELD_OUT, learning_rate=0, max_steps=2)])
    sft, kto = result.stages
    assert kto.manifest["objective"] == "kto" and sft.manifest["objective"] == "sft"
    assert kto.metrics["kto_margin"] == pytest.approx(0.0, abs=1e-5)  # the SFT-trained adapter is the reference
    assert kto.metrics["eval_loss"] == pytest.approx(0.5, abs=1e-5)


def test_one_label_only_is_refused_and_imbalance_warns(tiny_models, tmp_path, caplog):
    trainer = Trainer(tiny_models("llama"), technique="lora", formatter="kto", output_dir=tmp_path / "o",
                      progress=False)
    with pytest.raises(DataError, match=r"every row has label true \(desirable\); KTO needs both") as info:
        trainer.fit(TRAIN[:16])
    assert "\n" not in str(info.value) and not (tmp_path / "o").exists()
    with pytest.raises(DataError, match=r"eval_data.*every row has label false"):
        trainer.fit(TRAIN, eval_data=HELD_OUT[3:])

    from finetune_sdk.objectives.kto_training import check_label_balance

    caplog.set_level(logging.WARNING, logger="finetune_sdk")
    logging.getLogger("finetune_sdk").propagate = True
    examples = [{"desirable": True}] * 30 + [{"desirable": False}] * 10
    check_label_balance(examples, 1.0, 1.0, "ratings.jsonl")
    assert "30 desirable and 10 undesirable" in caplog.text
    assert "desirable_weight in [0.33, 0.44] or undesirable_weight in [2.25, 3.00]" in caplog.text
    caplog.clear()
    check_label_balance(examples, 0.4, 1.0, "ratings.jsonl")  # 0.4 * 30 / 10 = 1.2: in range
    check_label_balance(examples[:20] + examples[30:], 1.0, 1.0, "ratings.jsonl")  # 20:10 at weights 1 -> 2.0
    assert caplog.text.count("outside KTO's recommended") == 1


@pytest.mark.parametrize("line, field", [
    ({"prompt": "hi", "completion": "yo", "label": "yes"}, "column 'label' must be true (desirable) or false (undesirable), a JSON boolean, got str 'yes'"),
    ({"prompt": "hi", "completion": "yo", "label": 1}, "got int 1"),
    ({"prompt": "hi", "completion": "yo", "label": None}, "'label' must be true (desirable) or false (undesirable)"),
    ({"prompt": "hi", "label": True}, "needs columns (prompt, completion, label); this row has label, prompt"),
])
def test_bad_rows_are_one_line_naming_file_line_and_field(tiny_models, tmp_path, line, field):
    data = tmp_path / "ratings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAIN[:2]) + json.dumps(line) + "\n")
    trainer = Trainer(tiny_models("llama"), technique="lora", formatter="kto", output_dir=tmp_path / "o",
                      progress=False)
    with pytest.raises(DataError) as info:
        trainer.fit(str(data))
    message = str(info.value)
    assert message.startswith(f"{data} line 3: ") and field in message and "\n" not in message
    assert not (tmp_path / "o").exists()


def test_kto_rows_are_recognised_from_their_columns(tiny_models):
    from finetune_sdk.training.planning import detect_formatter
    from finetune_sdk.plugin_manager import get_plugin_host
    from finetune_sdk.testing.tiny import tiny_tokenizer

    host = get_plugin_host()
    assert detect_formatter(["prompt", "completion", "label"], tiny_tokenizer(), "causal-lm", host) == "kto"
    assert detect_formatter(["prompt", "completion"], tiny_tokenizer(), "causal-lm", host) == "chat-template"
    with pytest.raises(Exception, match="formatter 'kto' makes kto data but technique 'classifier'"):
        Trainer(tiny_models("llama"), technique="classifier", formatter="kto")


def test_mismatched_pairs_take_the_next_rows_completion_and_the_content_stays_literal():
    from finetune_sdk.data.rows import Rows
    from finetune_sdk.objectives.kto_training import encode_kto
    from finetune_sdk.plugins.formatters.kto import KTOFormatter
    from finetune_sdk.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    rows = [{"prompt": "p0", "completion": "</s>c0", "label": True},
            {"prompt": "p1", "completion": "c1", "label": False}, {"prompt": "p2", "completion": "c2", "label": True}]
    encoded = encode_kto(Rows(rows, ["r0", "r1", "r2"], "mem"), KTOFormatter(), tok, {"max_length": 128})
    decode = lambda seq: tok.decode(seq["input_ids"])  # noqa: E731
    assert [ex["desirable"] for ex in encoded.examples] == [True, False, True]
    assert "p0" in decode(encoded.examples[0]["kl"]) and "c1" in decode(encoded.examples[0]["kl"])
    assert "p2" in decode(encoded.examples[2]["kl"]) and "c0" in decode(encoded.examples[2]["kl"])  # wraps around
    assert encoded.examples[0]["completion"]["input_ids"].count(tok.eos_token_id) == 1  # "</s>" in content: text


def test_kto_loss_matches_the_papers_formula():
    from finetune_sdk.objectives.kto_training import kto_loss

    policy, reference = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -1.0, -3.0])
    kl_policy, kl_reference = torch.tensor([-4.0, -4.0, -4.0]), torch.tensor([-4.3, -4.1, -4.2])
    desirable = torch.tensor([True, False, True])
    loss, logratios, kl = kto_loss(policy, reference, kl_policy, kl_reference, desirable, 0.5, 2.0, 3.0)
    z0 = 0.2  # mean of 0.3, 0.1, 0.2
    expected = (2 * (1 - torch.sigmoid(torch.tensor(0.5 * (0.5 - z0))))
                + 3 * (1 - torch.sigmoid(torch.tensor(0.5 * (z0 + 1.0))))
                + 2 * (1 - torch.sigmoid(torch.tensor(0.5 * (0.0 - z0))))) / 3
    assert float(kl) == pytest.approx(z0) and float(loss) == pytest.approx(float(expected))
    assert logratios.tolist() == pytest.approx([0.5, -1.0, 0.0])
    _, _, clamped = kto_loss(policy, reference, kl_reference, kl_policy, desirable, 0.5)
    assert float(clamped) == 0.0  # a negative KL estimate is clamped at 0


def test_cli_trains_lora_with_the_kto_formatter(tiny_models, tmp_path):
    from click.testing import CliRunner

    from finetune_sdk.cli.main import cli

    data, held = tmp_path / "ratings.jsonl", tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    held.write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_models("llama")), "--data", str(data),
                                      "--eval-data", str(held), "--technique", "lora", "--formatter", "kto",
                                      "--max-steps", "2", "--beta", "0.2", "--undesirable-weight", "1.2",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "finetune_manifest.json").read_text())
    assert manifest["objective"] == "kto" and (out / "adapter_model.safetensors").exists()
    assert manifest["options"]["beta"] == 0.2 and manifest["options"]["undesirable_weight"] == 1.2
    assert {"kto_margin", "kto_kl", "eval_loss"} <= set(manifest["metrics"])
    bad = CliRunner().invoke(cli, ["train", "--model", str(tiny_models("llama")), "--data", str(data),
                                   "--formatter", "kto", "--beta", "0", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "option 'beta' must be greater than 0" in bad.output
    assert "Traceback" not in bad.output


def kto_job(model_dir, data, out, crash_at=None, resume=False):
    """``finetune train`` on KTO rows in a child process; ``crash_at``: SIGKILLed after that step."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FINETUNE_SDK_CRASH_AT_STEP", None)
    if crash_at:
        env["FINETUNE_SDK_CRASH_AT_STEP"] = str(crash_at)
    args = ["train", "--model", str(model_dir), "--data", str(data), "--technique", "lora", "--formatter", "kto",
            "--max-steps", "6", "--save-steps", "2", "--per-device-train-batch-size", "4", "--learning-rate",
            "0.01", "--seed", "3", "-o", str(out)] + (["--resume"] if resume else [])
    return subprocess.run([sys.executable, "-m", "finetune_sdk", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_a_sigkilled_kto_run_resumes_to_the_uninterrupted_weights(tiny_models, tmp_path):
    """Same weights within 1e-6: CPU training is deterministic given the seed (shuffling and RNG states restored
    from the checkpoint, dropout off under KTO) and the reference log-probs are recomputed on resume from the same
    starting policy, so only float summation order could differ; a wrong reference or a replayed batch moves the
    adapter by far more (lr 1e-2)."""
    import signal

    from safetensors.torch import load_file

    from finetune_sdk.training.checkpoints import checkpoints_dir

    data = tmp_path / "ratings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    model_dir = tiny_models("llama")
    out = tmp_path / "crashed"
    crashed = kto_job(model_dir, data, out, crash_at=5)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert not out.exists() and (checkpoints_dir(out) / "checkpoint-4").is_dir()
    resumed = kto_job(model_dir, data, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    reference = kto_job(model_dir, data, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    a = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), (key, (a[key] - b[key]).abs().max())


def test_a_kto_run_stopped_mid_way_resumes_to_the_uninterrupted_weights(tiny_models, tmp_path, monkeypatch):
    """In-process stand-in for the SIGKILL test above (fast): the run raises after step 5, checkpoints 2 and 4 stay
    on disk, ``resume=True`` continues from checkpoint-4 (reference recomputed from the same starting policy) and
    ends with the uninterrupted run's adapter and metrics, within 1e-6 (float summation order only)."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import finetune_sdk.training.engine as run_engine

    class Stop(Exception):
        pass

    class StopAtStep(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                raise Stop(self.step)

    def run(out, **fit):
        return Trainer(tiny_models("llama"), technique="lora", formatter="kto", output_dir=out, progress=False,
                       max_steps=6, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, seed=3,
                       logging_steps=1).fit(TRAIN, eval_data=HELD_OUT, **fit)

    reference = run(tmp_path / "reference")
    monkeypatch.setattr(run_engine, "CrashAtStep", StopAtStep)
    monkeypatch.setenv("FINETUNE_SDK_CRASH_AT_STEP", "5")
    with pytest.raises(Stop):
        run(tmp_path / "run")
    monkeypatch.delenv("FINETUNE_SDK_CRASH_AT_STEP")
    resumed = run(tmp_path / "run", resume=True)
    a = load_file(str(reference.output_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.output_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), (key, (a[key] - b[key]).abs().max())
    for key in ("train_loss", "eval_loss", "kto_margin"):
        assert resumed.metrics[key] == pytest.approx(reference.metrics[key], rel=1e-4, abs=1e-6), key
    assert reference.metrics["kto_margin"] > 0


def test_memory_estimate_and_advisor_know_kto():
    from transformers import LlamaConfig

    from finetune_sdk.advice.advisor import advise, check_run_memory
    from finetune_sdk.advice.memory import estimate_training_memory

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=8000)
    shape = {"technique": "lora", "batch_size": 4, "seq_len": 256}
    sft = estimate_training_memory(config, **shape, chunked_loss=False)
    kto = estimate_training_memory(config, **shape, objective="kto")
    dpo = estimate_training_memory(config, **shape, objective="dpo")
    # no second model: the reference log-probs are precomputed; the mismatched pairs' no-grad pass is never the peak
    assert (kto.weights, kto.activations, kto.total) == (sft.weights, sft.activations, sft.total)
    assert kto.activations > estimate_training_memory(config, **shape).activations  # KTO uses full logits
    assert dpo.activations > kto.activations  # chosen and rejected: twice the sequences
    assert any("KTO" in note and "no second model" in note for note in kto.notes)
    advice = advise(config, dataset_rows=500, memory_bytes=8 * 2**30, device="cpu", objective="kto")
    assert any("mismatched pairs" in reason for reason in advice.reasons)

    examples = [{"completion": {"input_ids": [1] * 40}, "kl": {"input_ids": [1] * 70}, "desirable": True}]
    estimate = check_run_memory(config, "lora", None, {"max_length": 512, "per_device_train_batch_size": 4},
                                examples, objective="kto")
    assert estimate is not None and estimate.seq_len == 70 and any("KTO" in n for n in estimate.notes)
