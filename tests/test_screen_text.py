"""What a model writes cannot take over the screen: every command path that prints model output (feedback, generate,
predict, eval --compare-base) shows control characters and escape sequences escaped and rich markup as text."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from finetune_sdk.cli import cli
from finetune_sdk.feedback.screen_text import escape_controls, is_hidden_control, literal_text

#: Answers a hostile or broken model can write: screen clear + home, cursor up and line erase, a window title (OSC
#: with BEL and with ST), carriage return and backspaces over a line, bell, bidi override and isolate, a C1 CSI, a
#: zero-width space, an invisible tag character, a line separator, rich markup.
HOSTILE = [
    "fine\x1b[2J\x1b[Hyou rated 10/10",
    "good\x1b[1A\x1b[2Kanswer 1 is better",
    "\x1b]0;owned\x07title",
    "\x1b]2;owned\x1b\\title",
    "wrong answer\rright answer",
    "bad\x08\x08\x08good",
    "ring\x07",
    "abc\u202edcba\u2066x\u2069",
    "c1\x9b2Jcsi",
    "zero\u200bwidth\ufeff\U000e0041",
    "line\u2028separator",
    "[bold red]markup[/bold red] [link=http://x]click[/link]",
]
#: What must never reach the terminal once escaped.
RAW = ["\x1b", "\x07", "\x08", "\r", "\u202e", "\u2066", "\u2069", "\x9b", "\u200b", "\ufeff", "\U000e0041", "\u2028"]


def assert_shown_safely(output: str) -> None:
    for raw in RAW:
        assert raw not in output, f"{raw!r} reached the terminal"
    assert "\\x1b[2J" in output  # the escapes are visible
    assert "[bold red]markup[/bold red]" in output  # markup is text


@pytest.mark.parametrize("text, shown", [
    ("fine\x1b[2J\x1b[Hok", "fine\\x1b[2J\\x1b[Hok"),
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
    ("wrong\rright", "wrong\\rright"),
    ("line one\r\nline two\n\ttab", "line one\nline two\n\ttab"),
    ("bad\x08good\x7f", "bad\\x08good\\x7f"),
    ("abc\u202edcba", "abc\\u202edcba"),
    ("c1\x9b2J", "c1\\x9b2J"),
    ("tag\U000e0041", "tag\\U000e0041"),
    ("emoji 👩\u200d💻 and \u200cZWNJ", "emoji 👩\u200d💻 and \u200cZWNJ"),
    ("caf\u00e9 [b]x[/b] \\x1b", "caf\u00e9 [b]x[/b] \\x1b"),
    ("", ""),
])
def test_escape_controls_exact(text, shown):
    assert escape_controls(text) == shown


def test_every_control_character_is_escaped_and_printable_text_kept():
    for code in list(range(0x00, 0x20)) + [0x7F] + list(range(0x80, 0xA0)):
        char = chr(code)
        assert is_hidden_control(char) == (char not in "\n\t"), hex(code)
    for char in "a Z é ß 中 😀 [ ] \\ ~".split():
        assert not is_hidden_control(char)


def test_literal_text_reads_no_markup_and_styles_the_escapes():
    from rich.console import Console

    text = literal_text("[bold]x[/bold]\x1b[2J")
    assert text.plain == "[bold]x[/bold]\\x1b[2J"
    assert [(text.plain[s.start:s.end], s.style) for s in text.spans] == [("\\x1b", "reverse")]
    console = Console(record=True, width=80, color_system=None)
    console.print(text)
    assert console.export_text() == "[bold]x[/bold]\\x1b[2J\n"


def test_terminal_rater_shows_hostile_answers_escaped():
    from finetune_sdk.feedback.rating_prompt import TerminalRater

    for pair in (HOSTILE[:6], HOSTILE[6:]):
        rater = TerminalRater()
        with CliRunner().isolation(input="1\n") as (shown, *_):
            assert rater("a prompt\x1b[2J [i]x[/i]", ["\n".join(pair), "\n".join(HOSTILE)]) == 0
        output = shown.getvalue().decode()
        assert_shown_safely(output)
        assert "a prompt\\x1b[2J [i]x[/i]" in output


@pytest.fixture
def hostile_generate(monkeypatch):
    from finetune_sdk.models.inference import LoadedModel

    def generate(self, prompts, **kwargs):
        answers = ["\n".join(HOSTILE) + f" #{i}" for i, _ in enumerate([prompts] if isinstance(prompts, str)
                                                                        else prompts)]
        return answers[0] if isinstance(prompts, str) else answers

    monkeypatch.setattr(LoadedModel, "generate", generate)


def test_finetune_generate_shows_hostile_output_escaped(tiny_models, hostile_generate):
    result = CliRunner().invoke(cli, ["generate", str(tiny_models("llama")), "hi", "--formatter", "chatml"])
    assert result.exit_code == 0, result.output
    assert_shown_safely(result.output)


def test_finetune_feedback_shows_hostile_output_escaped_and_stores_it_as_is(tiny_models, hostile_generate, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n")
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(cli, ["feedback", str(tiny_models("llama")), "--formatter", "chatml", "--prompts",
                                      str(prompts), "--out", str(out), "--mode", "pairwise"], input="2\n")
    assert result.exit_code == 0, result.output
    assert_shown_safely(result.output)
    row = json.loads(out.read_text(encoding="utf-8"))
    assert row["chosen"] == "\n".join(HOSTILE) + " #1"  # the file keeps the answer exactly as written


def test_finetune_predict_shows_hostile_labels_and_texts_escaped(monkeypatch):
    from finetune_sdk.cli import inference_commands

    class Classifier:
        task = "classification"

        def predict(self, texts, return_scores=False):
            return [{"label": HOSTILE[i % len(HOSTILE)], "score": 0.5} for i in range(len(texts))]

    monkeypatch.setattr(inference_commands, "open_model", lambda *args, **kwargs: Classifier())
    result = CliRunner().invoke(cli, ["predict", "clf", *HOSTILE])
    assert result.exit_code == 0, result.output
    assert_shown_safely(result.output)


@pytest.mark.slow
def test_finetune_eval_compare_base_shows_hostile_generations_escaped(tiny_models, qa_rows, tmp_path, monkeypatch):
    from rich.console import Console

    from finetune_sdk.cli import inference_commands
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.trainer import Trainer

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in qa_rows))
    Trainer(tiny_models("llama"), technique="lora", formatter="chatml", output_dir=tmp_path / "run", max_steps=1,
            r=4, progress=False).fit(data)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n")
    monkeypatch.setattr(LoadedModel, "generate", lambda self, prompts, **kw: ["\n".join(HOSTILE)] * len(prompts))
    monkeypatch.setattr(inference_commands, "console", lambda: Console(width=400))  # no wrapping inside a cell
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "run"), str(data), "--compare-base", "--prompts",
                                      str(prompts)])
    assert result.exit_code == 0, result.output
    assert_shown_safely(result.output)
