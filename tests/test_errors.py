"""Bad input: one clear line naming what and where, and nothing written to output_dir."""

from __future__ import annotations

import json

import pytest

from finetune_sdk import Trainer
from finetune_sdk.errors import ConfigError, DataError, FinetuneError, ModelNotFoundError


def assert_one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and message


@pytest.mark.parametrize("kwargs,pattern", [
    ({"technique": "lroa"}, r"unknown technique 'lroa' \(did you mean 'lora'.*available: classifier, full, lora, qlora"),
    ({"quantizer": "nf5"}, r"unknown quantizer 'nf5' \(did you mean 'nf4'\?\); available: int8, nf4"),
    ({"formatter": "alpacca"}, r"unknown formatter 'alpacca' \(did you mean 'alpaca'\?\)"),
    ({"technique": "full", "quantizer": "nf4"}, r"technique 'full' can't train a nf4-quantized model"),
    ({"technique": "qlora", "quantizer": "none"}, r"technique 'qlora' needs a quantized base"),
    ({"technique": "qlora", "quantizer": "int8"}, r"technique 'qlora' can't train on a base quantized with 'int8'"),
    ({"learning_rat": 1e-3}, r"unknown option 'learning_rat' \(did you mean 'learning_rate'"),
    ({"r": "eight"}, r"option 'r' must be int, got 'eight'"),
    ({"technique": "classifier", "formatter": "alpaca"}, r"formatter 'alpaca' makes causal-lm data"),
    ({"fp16": True}, r"fp16 mixed precision needs a CUDA GPU"),
])
def test_bad_configuration_is_refused_before_loading(llama_dir, tmp_path, kwargs, pattern):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=pattern) as info:
        Trainer(llama_dir, output_dir=out, **kwargs)
    assert_one_line(info)
    assert not out.exists()


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"model path ./no/such/model does not exist"):
        Trainer("./no/such/model")
    with pytest.raises(ModelNotFoundError, match=r"GGUF file .*missing.gguf does not exist"):
        Trainer(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face model folder"):
        Trainer(tmp_path / "empty")


def test_hub_id_not_in_cache_is_a_clear_error(tmp_path):
    trainer = Trainer("nobody/not-a-cached-model", output_dir=tmp_path / "out", progress=False)
    with pytest.raises(ModelNotFoundError, match="can't load the tokenizer of nobody/not-a-cached-model"):
        trainer.fit([{"text": "hello"}])
    assert not (tmp_path / "out").exists()


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines,pattern", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": "b"', ''],
     r"train.jsonl line 2: malformed JSON"),
    (['{"prompt": "a", "completion": "b"}', '[1, 2]'], r"train.jsonl line 2: expected a JSON object, got list"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "answer": "b"}'],
     r"train.jsonl line 2: formatter 'chatml' needs columns .*this row has answer, prompt"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": 5}'],
     r"train.jsonl line 2: column 'completion' must be str, got int"),
    ([''], r"train.jsonl: the dataset is empty"),
])
def test_bad_data_names_file_and_line(llama_dir, tmp_path, lines, pattern):
    data = write_jsonl(tmp_path / "train.jsonl", lines)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern) as info:
        Trainer(llama_dir, formatter="chatml", output_dir=out, progress=False).fit(data)
    assert_one_line(info)
    assert not out.exists()


def test_other_data_errors(llama_dir, tmp_path):
    trainer = Trainer(llama_dir, output_dir=tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="no such file"):
        trainer.fit(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type .txt"):
        trainer.fit(tmp_path / "data.txt")
    with pytest.raises(DataError, match="the dataset is empty"):
        trainer.fit([])
    with pytest.raises(DataError, match=r"train_data\[1\]: each row must be a dict"):
        trainer.fit([{"text": "a"}, "b"])
    with pytest.raises(DataError, match="can't tell which formatter fits the columns foo"):
        trainer.fit([{"foo": "a"}])
    (tmp_path / "t.csv").write_text("prompt,completion\nhi,\n")
    assert not (tmp_path / "out").exists()


def test_csv_json_and_parquet_are_read(tmp_path):
    from finetune_sdk.data.rows import load_rows

    rows = [{"prompt": "hi", "completion": "yo"}, {"prompt": "a", "completion": "b"}]
    (tmp_path / "d.csv").write_text("prompt,completion\nhi,yo\na,b\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for suffix in ("csv", "json", "parquet"):
        loaded = load_rows(tmp_path / f"d.{suffix}")
        assert loaded.rows == rows
    assert load_rows(tmp_path / "d.csv").where[1].endswith("d.csv line 3")
    assert load_rows(tmp_path / "d.csv").fingerprint == load_rows(rows).fingerprint


def test_classifier_unknown_label_at_evaluate_names_it(llama_dir, tmp_path):
    rows = [{"text": "red", "label": "colour"}, {"text": "cat", "label": "animal"}] * 4
    trainer = Trainer(llama_dir, technique="classifier", output_dir=tmp_path / "out", progress=False,
                      num_train_epochs=1)
    trainer.fit(rows)
    with pytest.raises(DataError, match=r"eval_data\[1\]: label 'plant' is not one of the classifier's labels "
                                        r"\(animal, colour\)"):
        trainer.evaluate([{"text": "red", "label": "colour"}, {"text": "tree", "label": "plant"}])
    assert trainer.predict("tree") in ("animal", "colour")  # unseen texts get a known label


def test_errors_are_finetune_errors():
    assert issubclass(ConfigError, FinetuneError) and issubclass(DataError, FinetuneError)
