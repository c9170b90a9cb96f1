"""Issue 11, kinds 4 and 5: label order does not depend on the file format; no metric is computed over nothing."""

from __future__ import annotations

import csv
import json

import pytest

import finetune_sdk
from finetune_sdk import Stage, Task, Trainer
from finetune_sdk.errors import DataError
from finetune_sdk.data.labels import label_order

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "red"]
ROWS = [{"text": f"the {w} is here", "label": i} for i, w in enumerate(WORDS)]


def write(path, rows):
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_integer_labels_keep_their_numbers_from_every_file_format(tiny_models, tmp_path, suffix):
    data = write(tmp_path / f"train{suffix}", ROWS)
    trainer = Trainer(tiny_models("llama"), technique="classifier", output_dir=tmp_path / "out", max_steps=2,
                      progress=False)
    result = trainer.fit(data)
    expected = [str(i) for i in range(12)]
    assert result.manifest["labels"] == expected
    config = json.loads((result.output_dir / "classifier_config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(12)}
    loaded = finetune_sdk.load(result.output_dir)
    assert loaded.labels == expected
    scores = loaded.predict("the ten is here", return_scores=True)["scores"]
    assert list(scores) == expected  # output index k is class k
    metrics = loaded.evaluate(data)  # evaluation maps "10" (csv) and 10 (jsonl) to output 10, as training did
    assert metrics["eval_rows_scored"] == 12 and metrics["eval_rows_skipped"] == 0


def test_label_order_from_other_sources():
    assert label_order(["2", 10, "1"]) == [str(i) for i in range(11)]  # mixed int and integer strings
    assert label_order(["-10", "-2", "3"]) == ["-10", "-2", "3"]
    assert label_order(["b", "a", "10"]) == ["10", "a", "b"]  # not all integers: sorted as strings


def test_parquet_integer_labels_match_jsonl(tiny_models, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"text": r["text"], "label": str(r["label"])} for r in ROWS]  # integer-looking strings
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "train.parquet")
    trainer = Trainer(tiny_models("llama"), technique="classifier", output_dir=tmp_path / "o", max_steps=1,
                      progress=False)
    assert trainer.fit(tmp_path / "train.parquet").manifest["labels"] == [str(i) for i in range(12)]


LONG = [{"prompt": "word " * 80, "completion": "short answer"} for _ in range(3)]


def test_an_eval_set_cut_off_entirely_is_refused_not_a_perfect_score(tiny_models, tmp_path):
    trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "out", max_length=64,
                      max_steps=1, progress=False)
    with pytest.raises(DataError, match=r"data: nothing left to score: all 3 rows have no answer tokens left after "
                                        r"truncation to max_length=64"):
        trainer.evaluate(LONG)
    ok = [{"prompt": "what is red?", "completion": "a colour."}] * 4
    result = trainer.fit(ok)
    with pytest.raises(DataError, match="nothing left to score"):
        finetune_sdk.load(result.output_dir).evaluate(LONG)
    metrics = trainer.evaluate(ok + LONG)  # some rows fit: they are scored, the rest counted as skipped
    assert metrics["eval_rows_scored"] == 4 and metrics["eval_rows_skipped"] == 3 and metrics["eval_loss"] > 0
    with pytest.raises(DataError, match="nothing left to score"):
        trainer.compare(LONG)


def test_classifier_and_dpo_evaluators_refuse_nothing_to_score(tiny_models, tmp_path):
    from finetune_sdk.data.encoding import Encoded
    from finetune_sdk.objectives.dpo_training import evaluate_preference

    trainer = Trainer(tiny_models("llama"), technique="classifier", labels=["a", "b"], progress=False)
    with pytest.raises(DataError, match="nothing left to score: all 2 rows have no tokens to classify"):
        trainer.evaluate([{"text": "", "label": "a"}, {"text": "", "label": "b"}])
    metrics = trainer.evaluate([{"text": "", "label": "a"}, {"text": "hello", "label": "b"}])
    assert metrics["eval_rows_scored"] == 1 and metrics["eval_rows_skipped"] == 1
    with pytest.raises(DataError, match="pairs.jsonl: nothing left to score: all 2 rows have a chosen or rejected"):
        evaluate_preference(None, Encoded(dropped=2), 0, 0.1, source="pairs.jsonl")


def test_dpo_and_task_metrics_report_rows_scored_and_skipped(tiny_models, tmp_path):
    pairs = [{"prompt": f"what is {a}?", "chosen": f"{a} is a number.", "rejected": "no."} for a in range(4)]
    dpo = Trainer(tiny_models("llama"), formatter="preference", output_dir=tmp_path / "dpo", max_steps=1,
                  progress=False).fit(pairs, eval_data=pairs[:2])
    assert dpo.metrics["eval_rows_scored"] == 2 and dpo.metrics["eval_rows_skipped"] == 0
    rows = [{"prompt": f"what is {a}?", "completion": f"{a} is a number."} for a in range(4)]
    tasks = Trainer(tiny_models("llama"), output_dir=tmp_path / "mt", max_steps=1, progress=False).fit(
        [Task("a", rows, formatter="chatml", eval_data=rows[:3]), Task("b", rows, formatter="chatml")])
    assert tasks.metrics["eval_a_rows_scored"] == 3 and tasks.metrics["eval_a_rows_skipped"] == 0


def test_finetune_eval_exits_2_when_nothing_is_left_to_score(tiny_models, tmp_path):
    from click.testing import CliRunner

    from finetune_sdk.cli.main import cli

    result = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "out", max_length=64,
                     max_steps=1, progress=False).fit([{"prompt": "hi", "completion": "yo"}] * 4)
    data = write(tmp_path / "long.jsonl", LONG)
    out = CliRunner().invoke(cli, ["eval", str(result.output_dir), str(data)])
    assert out.exit_code == 2 and "nothing left to score" in out.output and "Traceback" not in out.output


def test_stage_eval_set_cut_off_entirely_is_refused_before_training(tiny_models, tmp_path):
    trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "s", max_length=64,
                      max_steps=1, progress=False)
    with pytest.raises(DataError, match="no answer tokens left"):
        trainer.fit([Stage([{"prompt": "hi", "completion": "yo"}] * 4, eval_data=LONG)])
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("*.safetensors"))
