"""Ratings can be traced: every row records when, by whom (when named), which model version and how it sampled;
pairwise mode records a tie or both-bad answer that is never trained on; the formatters train on rows with the
fields unchanged; rounds can be filtered."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune_sdk.cli import cli
from finetune_sdk.errors import ConfigError, DataError
from finetune_sdk.feedback.answers import BOTH_BAD, TIE, Edited
from finetune_sdk.feedback.session import collect_feedback
from finetune_sdk.feedback.rating_record import check_rater, model_reference, rated_at, select_ratings
from finetune_sdk.feedback.ratings_file import KTO_ROWS, PREFERENCE_ROWS, SFT_ROWS

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
PROMPTS = ["what is 1 plus 2?", "what is 2 plus 2?", "what is 3 plus 1?", "what is 0 plus 3?"]
SAMPLING = {"do_sample": True, "temperature": 0.8, "max_new_tokens": 6, "top_k": 50, "stop_token_ids": [2, 5],
            "seed": 0}  # the tiny model sets no top_k: transformers samples with its default, 50


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def distinct_answers(monkeypatch):
    """Two different answers per prompt, whatever the tiny model samples."""
    from finetune_sdk.models.inference import LoadedModel

    monkeypatch.setattr(LoadedModel, "generate", lambda self, prompts, **kw: [f"answer {i + 1} to {p}"
                                                                              for i, p in enumerate(prompts)])


def test_pairwise_rows_carry_the_fields_and_ties_are_recorded(tiny_models, tmp_path, distinct_answers):
    model = tiny_models("llama")
    ratings = iter([1, TIE, BOTH_BAD, Edited("3")])
    out, sft = tmp_path / "pairs.jsonl", tmp_path / "written.jsonl"
    summary = collect_feedback(str(model), PROMPTS, out, mode="pairwise", sft_out=sft, formatter="chatml",
                               max_new_tokens=6, rater="ana", ask=lambda prompt, answers: next(ratings))
    assert (summary.rated, summary.unranked, summary.edited) == (3, 2, 1)
    written, edited = rows(out), rows(sft)
    record = {"rater": "ana", "model": {"ref": str(model)}, "sampling": SAMPLING}
    for row in written + edited:
        assert ISO_UTC.match(row.pop("rated_at"))
        assert {k: row.pop(k) for k in ("rater", "model", "sampling")} == record
    assert written == [
        {"prompt": PROMPTS[0], "chosen": f"answer 2 to {PROMPTS[0]}", "rejected": f"answer 1 to {PROMPTS[0]}"},
        {"prompt": PROMPTS[1], "chosen": f"answer 1 to {PROMPTS[1]}", "rejected": f"answer 2 to {PROMPTS[1]}",
         "preference": "tie"},
        {"prompt": PROMPTS[2], "chosen": f"answer 1 to {PROMPTS[2]}", "rejected": f"answer 2 to {PROMPTS[2]}",
         "preference": "both_bad"}]
    assert edited == [{"prompt": PROMPTS[3], "completion": "3"}]
    # a tie is a rating: the next session asks nothing
    again = collect_feedback(str(model), PROMPTS, out, mode="pairwise", sft_out=sft, formatter="chatml",
                             ask=lambda prompt, answers: pytest.fail("asked again"))
    assert again.already_rated == 4 and again.rated == 0


def test_no_rater_field_without_a_name_and_the_env_variable_names_one(tiny_models, tmp_path, monkeypatch,
                                                                      distinct_answers):
    monkeypatch.delenv("FINETUNE_SDK_RATER", raising=False)
    out = tmp_path / "thumbs.jsonl"
    collect_feedback(str(tiny_models("llama")), PROMPTS[:1], out, formatter="chatml", max_new_tokens=6,
                     ask=lambda prompt, answers: True)
    assert list(rows(out)[0]) == ["prompt", "completion", "label", "rated_at", "model", "sampling"]
    monkeypatch.setenv("FINETUNE_SDK_RATER", "bo")
    collect_feedback(str(tiny_models("llama")), PROMPTS[:2], out, formatter="chatml", max_new_tokens=6,
                     ask=lambda prompt, answers: False)
    assert [row.get("rater") for row in rows(out)] == [None, "bo"]
    for bad in ("", "  ", "a\x1b[2Jb", "x" * 101, 3):
        with pytest.raises(ConfigError, match="rater must be a name"):
            check_rater(bad)


def test_model_reference_of_a_result_records_its_manifest_hash(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "finetune_manifest.json").write_text('{"technique": "lora"}')
    digest = hashlib.sha256(b'{"technique": "lora"}').hexdigest()
    assert model_reference(str(folder)) == {"ref": str(folder), "manifest_sha256": digest}
    assert model_reference(folder, "bot@3") == {"ref": "bot@3", "manifest_sha256": digest}
    assert model_reference(object(), "bot@3") == {"ref": "bot@3"}
    assert model_reference("org/base-model") == {"ref": "org/base-model"}


def test_model_reference_resolves_a_registry_alias_to_its_version(tmp_path, monkeypatch):
    from finetune_sdk.registry import Registry

    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(tmp_path / "registry"))
    assert model_reference("bot@production") == {"ref": "bot@production"}  # no registry: none is created
    assert not (tmp_path / "registry").exists()
    result = tmp_path / "run"
    result.mkdir()
    (result / "finetune_manifest.json").write_text(json.dumps({"format_version": 1, "technique": "lora",
                                                                "task": "causal-lm", "options": {}}))
    (result / "adapter_config.json").write_text("{}")
    Registry().publish(result, "bot", aliases=["production"])
    reference = model_reference("bot@production")
    assert reference["ref"] == "bot@production" and reference["version"] == "bot@1"
    assert reference["manifest_sha256"] == hashlib.sha256((result / "finetune_manifest.json").read_bytes()).hexdigest()


def test_rated_at_is_iso_utc():
    from datetime import datetime, timedelta, timezone

    moment = datetime(2026, 12, 7, 3, 30, 5, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert rated_at(moment) == "2026-12-07T01:30:05Z"
    assert ISO_UTC.match(rated_at())


def test_row_shapes_take_the_fields_and_refuse_anything_else():
    meta = {"rater": "ana", "rated_at": "2026-12-07T01:30:05Z", "model": {"ref": "m"}, "sampling": {"seed": 0}}
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert PREFERENCE_ROWS.matches({**pair, **meta}) and PREFERENCE_ROWS.matches({**pair, "preference": "tie"})
    assert not PREFERENCE_ROWS.matches({**pair, "preference": "chosen"})
    assert not PREFERENCE_ROWS.matches({**pair, "notes": "x"}) and not PREFERENCE_ROWS.matches({**pair, "rater": 3})
    assert KTO_ROWS.matches({"prompt": "p", "completion": "c", "label": True, **meta})
    assert not SFT_ROWS.matches({"prompt": "p", "completion": "c", "label": True, **meta})
    assert not KTO_ROWS.matches({"prompt": "p", "completion": "c", "label": True, "preference": "tie"})


def write(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in items))
    return path


META = {"rater": "ana", "rated_at": "2026-12-07T01:30:05Z", "model": {"ref": "bot@production", "version": "bot@3"},
        "sampling": SAMPLING}


@pytest.mark.slow
def test_dpo_trains_on_traced_rows_with_ties_exactly_as_on_the_bare_pairs(tiny_models, tmp_path, caplog):
    from finetune_sdk.trainer import Trainer

    pairs = [{"prompt": f"what is {a} plus 1?", "chosen": f"{a + 1}.", "rejected": f"{a + 2}."} for a in range(4)]
    ties = [{**pairs[0], "preference": "tie"}, {**pairs[1], "chosen": "no", "preference": "both_bad"}]
    traced = write(tmp_path / "traced.jsonl", [{**row, **META} for row in pairs[:2] + ties + pairs[2:]])
    losses = []
    for name, data in (("bare", pairs), ("traced", traced)):
        with caplog.at_level(logging.INFO, logger="finetune_sdk"):
            result = Trainer(tiny_models("llama"), technique="lora", formatter="preference", r=4, max_steps=2,
                             per_device_train_batch_size=4, logging_steps=1, progress=False,
                             output_dir=tmp_path / name).fit(data)
        losses.append([e["loss"] for e in result.log_history if "loss" in e] + [result.metrics["train_loss"]])
    assert "traced.jsonl: 2 of 6 pairs are ties or both bad (column preference): skipped, not trained on" in caplog.text
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_encoding_rows_with_fields_equals_encoding_the_bare_rows(tiny_models):
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.objectives.kto_training import encode_kto
    from finetune_sdk.plugin_manager import get_plugin_host
    from finetune_sdk.data.pairs import encode_preference
    from finetune_sdk.testing.tiny import tiny_tokenizer

    host, tokenizer, options = get_plugin_host(), tiny_tokenizer(), {"max_length": 64}
    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    traced = [{**row, **META} for row in pairs] + [{**pairs[0], **META, "preference": "tie"}]
    preference = host.create("formatter", "preference")
    assert encode_preference(load_rows(traced), preference, tokenizer, options).examples == \
        encode_preference(load_rows(pairs), preference, tokenizer, options).examples
    thumbs = [{"prompt": f"q{i}", "completion": f"a {i}", "label": i % 2 == 0} for i in range(4)]
    kto = host.create("formatter", "kto")
    assert encode_kto(load_rows([{**r, **META} for r in thumbs]), kto, tokenizer, options).examples == \
        encode_kto(load_rows(thumbs), kto, tokenizer, options).examples
    chat = host.create("formatter", "chatml")
    sft = [{"prompt": "q", "completion": "a"}]
    assert chat.segments({**sft[0], **META}, tokenizer, options) == chat.segments(sft[0], tokenizer, options)


def test_a_file_of_ties_only_is_refused_in_one_line(tmp_path):
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.data.pairs import ranked_pairs

    data = write(tmp_path / "ties.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "preference": "tie"}])
    with pytest.raises(DataError, match="all 1 pairs are ties or both bad"):
        ranked_pairs(load_rows(data))


def test_classifier_view_of_pairs_skips_ties():
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.training.planning import reward_rows
    from finetune_sdk.plugin_manager import get_plugin_host

    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"},
             {"prompt": "q", "chosen": "c", "rejected": "d", "preference": "both_bad"}]
    out = reward_rows(load_rows(pairs), get_plugin_host().create("formatter", "preference"))
    assert out.rows == [{"text": "p\na", "label": "chosen"}, {"text": "p\nb", "label": "rejected"}]


def test_select_ratings_filters_rounds(tmp_path):
    first = {**META, "model": {"ref": "bot@production", "version": "bot@3", "manifest_sha256": "aa"}}
    second = {**META, "rated_at": "2026-12-08T09:00:00Z", "rater": "bo",
              "model": {"ref": "bot@production", "version": "bot@4", "manifest_sha256": "bb"}}
    items = [{"prompt": "p1", "chosen": "a", "rejected": "b", **first},
             {"prompt": "p2", "chosen": "a", "rejected": "b", **second},
             {"prompt": "p3", "chosen": "a", "rejected": "b", "preference": "tie", **second},
             {"prompt": "p4", "chosen": "a", "rejected": "b"}]
    path = write(tmp_path / "pairs.jsonl", items)
    prompts = lambda found: [row["prompt"] for row in found]  # noqa: E731
    assert prompts(select_ratings(path, model="bot@3")) == ["p1"]
    assert prompts(select_ratings(path, model="bb")) == ["p2", "p3"]
    assert prompts(select_ratings(path, model="bot@production")) == ["p1", "p2", "p3"]
    assert prompts(select_ratings(path, rater="bo", ranked_only=True)) == ["p2"]
    assert prompts(select_ratings(path, since="2026-12-08")) == ["p2", "p3"]
    assert prompts(select_ratings(path)) == ["p1", "p2", "p3", "p4"]
    with pytest.raises(ConfigError, match="since 'yesterday' is not an ISO-8601 time"):
        select_ratings(path, since="yesterday")


def test_cli_rater_option_and_tie_key(tiny_models, tmp_path, distinct_answers):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(cli, ["feedback", str(tiny_models("llama")), "--formatter", "chatml", "--prompts",
                                      str(prompts), "--out", str(out), "--mode", "pairwise", "--rater", "ana",
                                      "--max-new-tokens", "6"], input="t\nb\n2\n")
    assert result.exit_code == 0, result.output
    assert "t = tie, b = both bad" in result.output
    assert "3 ratings appended" in result.output and "2 tie/both-bad (recorded, not trained on)" in result.output
    assert [(row.get("preference"), row["rater"]) for row in rows(out)] == [("tie", "ana"), ("both_bad", "ana"),
                                                                            (None, "ana")]
    bad = CliRunner().invoke(cli, ["feedback", str(tiny_models("llama")), "--prompts", str(prompts), "--out",
                                   str(tmp_path / "x.jsonl"), "--rater", " "])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0 and "rater must be a name" in bad.output
    assert not (tmp_path / "x.jsonl").exists()
