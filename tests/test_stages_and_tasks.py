"""Workflows beyond one-shot SFT: continued pretraining, stages, multi-task, DPO, comparison, merge, torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import finetune_sdk
from finetune_sdk import Stage, Task, Trainer
from finetune_sdk.cli import cli
from finetune_sdk.errors import ConfigError
from finetune_sdk.registry import Registry
from finetune_sdk.training.stages_and_tasks import mix, mixing_probabilities

DOCS = [{"text": "the quick brown fox jumps over the lazy dog. " * 3},
        {"text": "a model learns to answer questions about its data. " * 2},
        {"text": "the cat sat on the mat and the dog sat on the log. " * 2}] * 4


def qa(a, b):
    return {"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}


def test_continued_pretraining_cuts_documents_into_blocks_and_loss_falls(tiny_models, tmp_path):
    trainer = Trainer(tiny_models("llama"), technique="full", formatter="text", output_dir=tmp_path / "out",
                      max_length=32, num_train_epochs=3, learning_rate=3e-3, progress=False)
    before = trainer.evaluate(DOCS)["eval_loss"]
    result = trainer.fit(DOCS)
    assert trainer.evaluate(DOCS)["eval_loss"] < before * 0.8
    tokens = sum(len(trainer.current_model().tokenizer(d["text"] + "</s>", add_special_tokens=False)["input_ids"])
                 for d in DOCS)
    assert result.metrics["examples"] == math.ceil(tokens / 32)  # concatenated, then cut into 32-token blocks


def test_sequential_stages_continue_one_adapter_and_chain_in_the_registry(tiny_models, tmp_path):
    registry = Registry(tmp_path / "reg")
    trainer = Trainer(tiny_models("llama"), technique="lora", output_dir=tmp_path / "run", progress=False,
                      publish_as="seq", registry=registry, learning_rate=1e-2)
    stages = [Stage([qa(a, b) for a in range(3) for b in range(3)], formatter="chatml", num_train_epochs=2),
              Stage([{"instruction": f"add {a} and {b}", "output": str(a + b)} for a in range(3) for b in range(3)],
                    formatter="alpaca", max_steps=3, name="alpaca")]
    result = trainer.fit(stages)
    assert [r.output_dir.name for r in result.stages] == ["stage-1", "stage-2"]
    assert result.stages[0].manifest["formatter"] == "chatml" and result.manifest["formatter"] == "alpaca"
    assert result.metrics["train_steps"] == 3 and result.stages[0].manifest["options"]["max_steps"] == -1
    assert registry.show("seq@2")["lineage"] == ["seq@1"]
    assert trainer.options["max_steps"] == -1  # stage options don't leak
    with pytest.raises(ConfigError, match="stage 2: unknown option 'lerning_rate'"):
        trainer.fit([Stage([qa(1, 1)]), Stage([qa(1, 2)], lerning_rate=1)])


def test_mixing_probabilities_and_counts():
    sizes = {"a": 300, "b": 100}
    assert mixing_probabilities(sizes, {}, "proportional", 1) == {"a": 0.75, "b": 0.25}
    assert mixing_probabilities(sizes, {"a": 1, "b": 3}, "explicit", 1) == {"a": 0.25, "b": 0.75}
    flat = mixing_probabilities(sizes, {}, "temperature", 1000)
    assert abs(flat["a"] - 0.5) < 0.01
    probabilities = mixing_probabilities(sizes, {"a": 1, "b": 3}, "explicit", 1)
    mixture, counts = mix({"a": list(range(300)), "b": list(range(1000, 1100))}, probabilities, 4000, seed=0)
    assert len(mixture) == 4000 and abs(counts["b"] / 4000 - 0.75) < 0.03
    assert sum(1 for x in mixture if x >= 1000) == counts["b"]
    with pytest.raises(ConfigError, match="needs a weight"):
        mixing_probabilities(sizes, {"a": 1}, "explicit", 1)


def test_multi_task_mixes_by_weight_and_reports_per_task_metrics(tiny_models, tmp_path, caplog):
    caplog.set_level("INFO", logger="finetune_sdk")
    import logging

    logging.getLogger("finetune_sdk").propagate = True
    adds = [qa(a, b) for a in range(5) for b in range(5)]
    words = [{"instruction": f"repeat {w}", "output": w} for w in ["red", "blue", "cat", "dog", "fish"] * 3]
    trainer = Trainer(tiny_models("llama"), technique="lora", output_dir=tmp_path / "mt", task_mixing="explicit",
                      num_train_epochs=2, learning_rate=1e-2, progress=False)
    result = trainer.fit([Task("adds", adds, formatter="chatml", eval_data=adds[:5], weight=1),
                          Task("words", words, formatter="alpaca", eval_data=words[:5], weight=3)])
    counts = result.metrics["task_examples"]
    assert sum(counts.values()) == len(adds) + len(words) == 40
    assert counts["words"] > counts["adds"] * 2  # ~3:1 as weighted
    for name in ("adds", "words"):
        assert f"eval_{name}_loss" in result.metrics and f"eval_{name}_perplexity" in result.metrics
    assert result.manifest["dataset"]["tasks"]["words"]["formatter"] == "alpaca"
    assert "task adds: eval_loss" in caplog.text
    assert any("eval_adds_loss" in entry for entry in result.log_history)  # logged during training too


DPO_TRAIN = [{"prompt": f"what is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
              "rejected": f"I do not know {a} {b}."} for a in range(4) for b in range(4)]
DPO_HELD_OUT = [{"prompt": f"what is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
                 "rejected": f"I do not know {a} {b}."} for a, b in [(4, 1), (5, 2), (1, 5), (6, 0)]]


@pytest.mark.parametrize("technique", ["lora", pytest.param("qlora", marks=pytest.mark.slow),
                                       pytest.param("full", marks=pytest.mark.slow)])
def test_dpo_raises_the_chosen_over_rejected_margin_on_held_out_pairs(tiny_models, tmp_path, technique):
    lr = {"lora": 2e-2, "qlora": 2e-2, "full": 2e-3}[technique]
    trainer = Trainer(tiny_models("llama"), technique=technique, formatter="preference", output_dir=tmp_path / "o",
                      num_train_epochs=4, learning_rate=lr, beta=0.5, progress=False,
                      **({"target_modules": "all-linear", "r": 16} if technique == "lora" else {}))
    result = trainer.fit(DPO_TRAIN, eval_data=DPO_HELD_OUT)
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.objectives.dpo_training import evaluate_preference
    from finetune_sdk.data.pairs import encode_preference

    base = Trainer(tiny_models("llama"), technique=technique, formatter="preference", progress=False).current_model()
    held = encode_preference(load_rows(DPO_HELD_OUT), base.formatter, base.tokenizer, trainer.options)
    before = evaluate_preference(base.model, held, base.tokenizer.pad_token_id, 0.5)["logp_margin"]
    after = result.metrics["logp_margin"]
    assert after > before + 1.0, (before, after)
    assert result.metrics["reward_accuracy"] >= 0.75 and result.manifest["objective"] == "dpo"


def test_reward_model_via_the_classifier_on_preference_pairs(tiny_models, tmp_path):
    trainer = Trainer(tiny_models("llama"), technique="classifier", formatter="preference", output_dir=tmp_path / "rm",
                      num_train_epochs=20, learning_rate=3e-2, progress=False)
    result = trainer.fit(DPO_TRAIN, eval_data=DPO_HELD_OUT)
    assert result.manifest["labels"] == ["chosen", "rejected"]
    assert result.metrics["accuracy"] >= 0.75
    scores = trainer.predict("what is 2 plus 2?\n2 plus 2 is 4.", return_scores=True)["scores"]
    assert set(scores) == {"chosen", "rejected"}


@pytest.mark.parametrize("technique", ["lora", "full"])
def test_compare_shows_the_tuned_model_better_and_writes_the_report(tiny_models, tmp_path, technique):
    rows = [qa(a, b) for a in range(4) for b in range(4)]
    trainer = Trainer(tiny_models("llama"), technique=technique, formatter="chatml", output_dir=tmp_path / "o",
                      num_train_epochs=4, learning_rate=1e-2 if technique == "lora" else 3e-3, progress=False,
                      **({"target_modules": "all-linear"} if technique == "lora" else {}))
    trainer.fit(rows)
    report = trainer.compare(rows[:6], prompts=["what is 1 plus 2?"], max_new_tokens=8, report_dir=tmp_path / "rep")
    assert report["tuned"]["eval_loss"] < report["base"]["eval_loss"]
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]
    assert report["generations"][0]["prompt"] == "what is 1 plus 2?"
    assert report["generations"][0]["base"] != report["generations"][0]["tuned"]
    saved = json.loads((tmp_path / "rep" / "comparison.json").read_text())
    assert saved["base"] == report["base"]
    html = (tmp_path / "rep" / "comparison.html").read_text()
    assert "<svg" in html and "what is 1 plus 2?" in html
    after = trainer.evaluate(rows[:6])["eval_loss"]  # the adapter is back on after the comparison
    assert abs(after - report["tuned"]["eval_loss"]) < 1e-6


def test_compare_base_from_the_cli_for_a_classifier(tiny_models, tmp_path):
    rows = [{"text": f"the {w} is {c}", "label": "warm" if c in ("red", "yellow") else "cold"}
            for w in ("cat", "dog", "bird") for c in ("red", "blue", "yellow", "green")]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = Trainer(tiny_models("llama"), technique="classifier", output_dir=tmp_path / "clf", num_train_epochs=30,
                     learning_rate=3e-2, per_device_train_batch_size=8, progress=False).fit(rows)
    out = CliRunner().invoke(cli, ["eval", str(result.output_dir), str(data), "--compare-base", "--report-dir",
                                   str(tmp_path / "rep")])
    assert out.exit_code == 0, out.output
    assert "accuracy" in out.output and "macro_f1" in out.output
    saved = json.loads((tmp_path / "rep" / "comparison.json").read_text())
    assert saved["tuned"]["accuracy"] >= saved["base"]["accuracy"]


@pytest.mark.parametrize("technique", ["lora", "qlora"])
def test_merged_model_matches_the_adapter(tiny_models, tmp_path, qa_rows, technique):
    # an fp32 base (dtype="auto" may pick bf16 on this CPU): merging into it is exact
    result = Trainer(tiny_models("llama"), technique=technique, formatter="chatml", output_dir=tmp_path / "o",
                     num_train_epochs=2, learning_rate=1e-2, progress=False, dtype="float32").fit(qa_rows)
    out = CliRunner().invoke(cli, ["merge", str(result.output_dir), "--out", str(tmp_path / "merged")])
    assert out.exit_code == 0, out.output
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    unmerged = finetune_sdk.load(result.output_dir, quantized=False)  # the adapter on an fp32 base
    ids = torch.tensor([unmerged.prompt_ids("what is 1 plus 2?")])
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - unmerged.model(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    reloaded = finetune_sdk.load(tmp_path / "merged")
    assert reloaded.generate("what is 1 plus 2?", max_new_tokens=5) == unmerged.generate("what is 1 plus 2?",
                                                                                         max_new_tokens=5)
    manifest = json.loads((tmp_path / "merged" / "finetune_manifest.json").read_text())
    assert manifest["merged_from"]["technique"] == technique


def test_merge_refuses_what_has_no_adapter(tiny_models, tmp_path, qa_rows):
    result = Trainer(tiny_models("llama"), technique="full", formatter="chatml", output_dir=tmp_path / "o",
                     max_steps=1, progress=False).fit(qa_rows)
    out = CliRunner().invoke(cli, ["merge", str(result.output_dir), "--out", str(tmp_path / "m")])
    assert out.exit_code == 2 and "no adapter to merge" in out.output
    assert not (tmp_path / "m").exists()


def lora_state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def kto_row(a, b):
    good = (a + b) % 2 == 0
    return {"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b if good else a - b}.",
            "label": good}


@pytest.mark.slow
@pytest.mark.parametrize("formatter, make_row", [("chatml", qa), ("kto", kto_row)], ids=["sft", "kto"])
def test_two_process_torchrun_reaches_the_weights_of_one_process(tiny_models, tmp_path, formatter, make_row):
    """Data parallel = the bigger batch: for SFT (token-count normaliser) and for KTO, whose example count and KL
    reference point are gathered over both processes (finetune_sdk.training.accumulation, kto)."""
    rows = [make_row(a, b) for a in range(4) for b in range(2)]  # 8 rows
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["train", "--model", str(tiny_models("llama")), "--data", str(data), "--formatter", formatter,
              "--num-train-epochs", "3", "--learning-rate", "0.01", "--lora-dropout", "0", "--seed", "0",
              "--dtype", "float32"]  # equal to 1e-5 in fp32; a bf16 base rounds differently for batches of 8 and 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "finetune_sdk", *common, "-o", str(tmp_path / "one"),
                          "--per-device-train-batch-size", "8"], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "finetune_sdk", *common, "-o", str(tmp_path / "two"),
                          "--per-device-train-batch-size", "4", "--nproc", "2"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = lora_state(tmp_path / "one"), lora_state(tmp_path / "two")
    assert a.keys() == b.keys()
    initial_gap = max((a[k] - torch.zeros_like(a[k])).abs().max().item() for k in a if "lora_B" in k)
    assert initial_gap > 1e-3  # training moved the weights...
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, (a[key] - b[key]).abs().max())  # ...identically
