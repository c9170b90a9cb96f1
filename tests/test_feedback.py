"""Collecting feedback: ``finetune feedback`` on scripted input and ``collect_feedback`` with an ``ask`` callable
write rows that train as they are (DPO, SFT, KTO), append safely (SIGKILL loses at most the current rating; a
torn last row is cut, a user's file never touched) and resume where they stopped."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune_sdk.cli import cli
from finetune_sdk.errors import ConfigError
from finetune_sdk.feedback.answers import QUIT, SKIP, Edited
from finetune_sdk.feedback.session import collect_feedback
from finetune_sdk.feedback.ratings_file import KTO_ROWS, RatingsAppender, encode_row

PROMPTS = ["what is 1 plus 2?", "what is 2 plus 2?", "what is 3 plus 1?", "what is 0 plus 3?", "what is 2 plus 1?"]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n\n")  # a blank line is no prompt
    return path


@pytest.fixture(scope="module")
def base_model(tiny_models):
    from finetune_sdk.trainer import Trainer

    return Trainer(tiny_models("llama"), formatter="chatml", progress=False).current_model()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def bare(items: list[dict]) -> list[dict]:
    """The rows without the fields that trace them (rated_at, model, sampling, rater: test_rating_record.py)."""
    from finetune_sdk.feedback.ratings_file import RECORD_FIELDS

    return [{k: v for k, v in row.items() if k not in RECORD_FIELDS} for row in items]


def feedback(runner, model, *args: str, input: str):
    result = runner.invoke(cli, ["feedback", str(model), "--formatter", "chatml", "--max-new-tokens", "6", *args],
                           input=input)
    assert result.exit_code == 0, result.output
    return result


def train(runner, model, data: Path, formatter: str, out: Path) -> dict:
    result = runner.invoke(cli, ["train", "--model", str(model), "--data", str(data), "--formatter", formatter,
                                 "--technique", "lora", "--r", "4", "--max-steps", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "finetune_manifest.json").read_text())


def test_pairwise_session_writes_preference_rows_that_train_with_dpo_and_edits_that_train_with_chatml(
        runner, llama_dir, prompts_file, tmp_path):
    out, sft = tmp_path / "pairs.jsonl", tmp_path / "sft.jsonl"
    result = feedback(runner, llama_dir, "--prompts", str(prompts_file), "--out", str(out), "--mode", "pairwise",
                      "--sft-out", str(sft), input="2\nx\ne\nthree plus one is four.\n1\n")
    pairs, edits = rows(out), rows(sft)
    assert [list(r) for r in pairs] == [["prompt", "chosen", "rejected", "rated_at", "model", "sampling"]] * 2
    assert [r["prompt"] for r in pairs] == [PROMPTS[0], PROMPTS[2]]
    shown = []  # the same model, prompts and seed from Python: the answers the terminal showed, in its order
    collect_feedback(str(llama_dir), prompts_file, tmp_path / "unused.jsonl", mode="pairwise", formatter="chatml",
                     max_new_tokens=6, ask=lambda prompt, answers: shown.append(answers) or SKIP)
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [(shown[0][1], shown[0][0]), (shown[2][0], shown[2][1])]
    assert all(r["chosen"] != r["rejected"] for r in pairs)
    assert bare(edits) == [{"prompt": PROMPTS[1], "completion": "three plus one is four."}]
    assert "2 ratings appended" in result.output and "1 written answer" in result.output
    assert train(runner, llama_dir, out, "preference", tmp_path / "dpo")["objective"] == "dpo"
    assert train(runner, llama_dir, sft, "chatml", tmp_path / "sft-run")["objective"] == "sft"


def test_thumbs_session_on_a_trained_result_writes_kto_rows_that_train_with_kto(runner, llama_dir, prompts_file,
                                                                                 tmp_path):
    out = tmp_path / "ratings.jsonl"
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "a sum."}) + "\n" for p in PROMPTS))
    train(runner, llama_dir, data, "chatml", tmp_path / "sft-run")
    feedback(runner, tmp_path / "sft-run", "--prompts", str(prompts_file), "--out", str(out),
             input="u\nd\nu\n")
    ratings = rows(out)
    assert [(r["prompt"], r["label"]) for r in ratings] == list(zip(PROMPTS[:3], [True, False, True]))
    assert all(isinstance(r["completion"], str) for r in ratings)
    assert train(runner, llama_dir, out, "kto", tmp_path / "kto")["objective"] == "kto"


def _wait_for(condition, what: str, proc: subprocess.Popen, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"feedback exited early ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _session(llama_dir: Path, prompts_file: Path, out: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "finetune_sdk", "feedback", str(llama_dir), "--formatter", "chatml",
               "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "4"]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _answer(proc: subprocess.Popen, key: str) -> None:
    proc.stdin.write(key.encode() + b"\n")
    proc.stdin.flush()


@pytest.mark.slow  # two sessions in subprocesses (~10 s idle)
def test_sigkill_mid_session_loses_at_most_the_current_rating_and_a_rerun_resumes(runner, llama_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    out, log = tmp_path / "ratings.jsonl", tmp_path / "session.log"

    # 1: two ratings given, killed while the third prompt waits for its rating: exactly the two are kept
    proc = _session(llama_dir, prompts_file, out, log)
    for key, count in (("u", 1), ("d", 2)):
        _wait_for(lambda: f"prompt {count}" in log.read_text(errors="replace"), f"prompt {count}", proc)
        _answer(proc, key)
    _wait_for(lambda: "prompt 3" in log.read_text(errors="replace"), "prompt 3", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [(r["prompt"], r["label"]) for r in rows(out)] == [(PROMPTS[0], True), (PROMPTS[1], False)]
    before = out.read_bytes()

    # 2: killed the moment a rating is given: that rating is whole or missing (a torn row is cut next time)
    proc = _session(llama_dir, prompts_file, out, log)
    _wait_for(lambda: "prompt 1" in log.read_text(errors="replace"), "the resumed prompt", proc)
    assert "3 of 5 prompts to rate (2 already rated)" in log.read_text()
    _answer(proc, "u")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    after = out.read_bytes()
    assert after.startswith(before)  # the rows before it are intact
    extra = after[len(before):]  # nothing, the whole third row, or (a crash inside the write) the start of it
    assert extra == b"" or extra.startswith(b'{"prompt": "what is 3 plus 1?", "completion": "')
    kept = 3 if extra.rstrip(b"\n").endswith(b'"label": true}') else 2

    # 3: the rerun asks only what has no whole row yet; every prompt ends with exactly one row, in order
    result = feedback(runner, llama_dir, "--prompts", str(prompts_file), "--out", str(out),
                      "--max-new-tokens", "4", input="u\n" * (5 - kept))
    assert f"{5 - kept} of 5 prompts to rate" in result.output
    final = rows(out)
    assert [r["prompt"] for r in final] == PROMPTS
    assert [r["label"] for r in final] == [True, False, True, True, True]
    assert out.read_bytes().startswith(before)


def test_python_api_resumes_by_prompt_count_with_the_same_answers(base_model, tmp_path):
    out = tmp_path / "ratings.jsonl"
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # listed twice: asked until it has two rows
    shown: list[tuple[str, str]] = []

    def script(*replies):
        replies = list(replies)

        def ask(prompt, answers):
            assert len(answers) == 1
            shown.append((prompt, answers[0]))
            return replies.pop(0)
        return ask

    first = collect_feedback(base_model, prompts, out, ask=script(True, SKIP, QUIT), max_new_tokens=6)
    assert (first.rated, first.skipped, first.remaining, first.out_rows) == (1, 1, 1, 1)
    second = collect_feedback(base_model, prompts, out, ask=script(False, True), max_new_tokens=6)
    assert (second.rated, second.already_rated, second.out_rows) == (2, 1, 3)
    assert [p for p, _ in shown] == [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    assert shown[1] == shown[3]  # a skipped prompt comes back with the same answer (seeded per prompt)
    final = rows(out)
    assert [(r["prompt"], r["completion"], r["label"]) for r in final] == [
        (shown[0][0], shown[0][1], True), (shown[3][0], shown[3][1], False), (shown[4][0], shown[4][1], True)]
    assert collect_feedback(base_model, prompts, out, ask=script()).already_rated == 3  # nothing left to ask


def test_python_api_pairwise_with_edits_and_bad_answers_from_ask(base_model, tmp_path):
    out, sft = tmp_path / "pairs.jsonl", tmp_path / "sft.jsonl"
    seen = []

    def ask(prompt, answers):
        seen.append(answers)
        return 1 if len(seen) == 1 else Edited("two plus two is four.")

    summary = collect_feedback(base_model, PROMPTS[:2], out, mode="pairwise", ask=ask, sft_out=sft,
                               max_new_tokens=6)
    assert (summary.rated, summary.edited) == (1, 1)
    assert bare(rows(out)) == [{"prompt": PROMPTS[0], "chosen": seen[0][1], "rejected": seen[0][0]}]
    assert bare(rows(sft)) == [{"prompt": PROMPTS[1], "completion": "two plus two is four."}]
    for reply, message in ((True, "in pairwise mode return 0 or 1"), (Edited("x"), "no sft_out file")):
        with pytest.raises(ConfigError, match=message):
            collect_feedback(base_model, [PROMPTS[2]], out, mode="pairwise", ask=lambda p, a, r=reply: r)
    assert len(rows(out)) == 1  # nothing written for a refused answer


class SameAnswer:
    """A model that gives the same answer however often it is sampled."""

    task = "causal-lm"

    def generate(self, prompts, **options):
        return ["four."] * len(prompts)


def test_a_pair_of_identical_answers_is_skipped_not_asked(tmp_path):
    out = tmp_path / "pairs.jsonl"
    summary = collect_feedback(SameAnswer(), PROMPTS[:2], out, mode="pairwise", ask=lambda p, a: pytest.fail(p))
    assert (summary.skipped, summary.rated, summary.out_rows) == (2, 0, 0)
    assert not out.exists()  # the file this session created and left empty is gone


NOT_A_MODEL = object()  # the checks below come before any model is loaded


@pytest.mark.parametrize("content,message", [
    (b'{"text": "my own data"}\n', "line 1 is not one of the thumbs ratings"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n', "holds preference pairs (prompt, chosen, rejected), "
                                                           "not thumbs ratings"),
    (encode_row({"prompt": "a", "completion": "b", "label": True}) + b"notes by hand", "ends with a line that is"),
    (b'{"prompt": "a", "completion": }', "ends with a line that is not a JSON row"),
    (b'{"prompt": "caf\xe9", "completion": "b", "label": true}\n', "line 1 is not UTF-8"),
])
def test_a_file_that_is_not_a_ratings_file_is_refused_and_left_as_it_is(tmp_path, content, message):
    out = tmp_path / "mine.jsonl"
    out.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        collect_feedback(NOT_A_MODEL, PROMPTS, out, ask=lambda p, a: True)
    assert out.read_bytes() == content


def test_a_torn_last_row_is_cut_and_only_it(base_model, tmp_path):
    out = tmp_path / "ratings.jsonl"
    whole = encode_row({"prompt": PROMPTS[0], "completion": "3", "label": True})
    torn = encode_row({"prompt": PROMPTS[1], "completion": "four é", "label": False})[:-6]  # cut mid-row
    out.write_bytes(whole + torn)
    summary = collect_feedback(base_model, PROMPTS[:2], out, ask=lambda p, a: False, max_new_tokens=4)
    assert summary.torn_bytes_cut == len(torn) and summary.rated == 1
    assert out.read_bytes().startswith(whole) and [r["prompt"] for r in rows(out)] == PROMPTS[:2]


def test_a_second_session_on_the_same_file_is_refused(tmp_path):
    out = tmp_path / "ratings.jsonl"
    with RatingsAppender(out, KTO_ROWS):
        with pytest.raises(ConfigError, match="being written by another finetune feedback session"):
            collect_feedback(NOT_A_MODEL, PROMPTS, out, ask=lambda p, a: True)


@pytest.mark.parametrize("args,message", [
    (["--prompts", "{missing}", "--out", "{out}"], "prompts file"),
    (["--prompts", "{empty}", "--out", "{out}"], "has no prompts"),
    (["--prompts", "{prompts}", "--out", "{tmp}/no-such-folder/r.jsonl"], "no-such-folder does not exist"),
    (["--prompts", "{prompts}", "--out", "{user_file}"], "is not one of the thumbs ratings"),
    (["--prompts", "{prompts}", "--out", "{out}", "--sft-out", "{out}"], "need a file of their own"),
    (["--prompts", "{prompts}", "--out", "{out}", "--mode", "pairwise", "--temperature", "0"],
     "temperature must be above 0"),
    (["--out", "{out}"], "Missing option '--prompts'"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(runner, prompts_file, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    user_file = tmp_path / "notes.jsonl"
    user_file.write_text('{"note": "keep me"}\n')
    values = {"missing": tmp_path / "none.txt", "empty": tmp_path / "empty.txt", "prompts": prompts_file,
              "out": tmp_path / "r.jsonl", "tmp": tmp_path, "user_file": user_file}
    result = runner.invoke(cli, ["feedback", "./not-loaded", *[a.format(**values) for a in args]])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.startswith("Error:") and len(result.output.strip().splitlines()) <= 2
    assert not (tmp_path / "r.jsonl").exists() and user_file.read_text() == '{"note": "keep me"}\n'
