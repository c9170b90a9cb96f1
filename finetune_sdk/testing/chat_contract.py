"""The chat-format round trip: what an export's templates render is, token for token, what training rendered.

For a formatter, the GGUF file's Jinja chat template (what llama.cpp and LM Studio read) and the Modelfile's Go
``TEMPLATE`` (what Ollama reads) are built from :meth:`~finetune_sdk.formatter.Formatter.chat_format` as
``finetune export`` builds them; each is rendered for one turn, one turn under the training ``system_prompt`` and a
two-turn history, and tokenized as llama.cpp tokenizes a prompt; the ids must equal the training rendering's.
The Go side runs Go's ``text/template`` (Ollama's engine) when a Go toolchain is installed and is skipped otherwise;
the Jinja side never needs Go.

Example:
    >>> from finetune_sdk.testing.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> llama_cpp_prompt_ids("<|im_start|>user\\nhi<|im_end|>\\n", tok)[0] == tok.convert_tokens_to_ids("<|im_start|>")
    True
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Ollama's template engine: Go's text/template over ``.Messages`` (as tests/test_ollama_templates.py runs it).
GO_RENDERER = """package main

import (
\t"encoding/json"
\t"os"
\t"text/template"
)

type Message struct {
\tRole    string
\tContent string
}

func main() {
\tvar in struct {
\t\tTemplate string
\t\tMessages []Message
\t}
\tif err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
\t\tpanic(err)
\t}
\tt := template.Must(template.New("m").Parse(in.Template))
\tif err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
\t\tpanic(err)
\t}
}
"""
SYSTEM_PROMPT = "You answer in one short sentence."
HISTORY = [{"role": "user", "content": "what is red?"}, {"role": "assistant", "content": "red is a colour."},
           {"role": "user", "content": "and the cat?"}, {"role": "assistant", "content": "the cat is an animal."}]


def go_available() -> bool:
    return shutil.which("go") is not None


def go_render(template: str, messages: list[dict[str, str]], system: str | None = None) -> str:
    """``template`` rendered by Go's ``text/template`` as Ollama renders a chat: ``system`` (the Modelfile's
    ``SYSTEM``) is put first when the messages carry no system message.

    Raises:
        subprocess.CalledProcessError: the template doesn't parse or execute (Go's message in ``stderr``).
    """
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    payload = json.dumps({"Template": template,
                          "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    with tempfile.TemporaryDirectory(prefix="finetune-go-") as folder:
        source = Path(folder) / "ollama_template.go"
        source.write_text(GO_RENDERER, encoding="utf-8")
        cache = os.environ.get("GOCACHE") or str(Path(tempfile.gettempdir()) / "finetune-sdk-gocache")
        env = {**os.environ, "GOCACHE": cache, "GOFLAGS": "", "GO111MODULE": "off"}
        done = subprocess.run([shutil.which("go") or "go", "run", str(source)], input=payload, capture_output=True,
                              text=True, env=env, timeout=300, check=True)
    return done.stdout


def llama_cpp_prompt_ids(text: str, tokenizer: Any, adds_bos: bool | None = None) -> list[int]:
    """``text`` tokenized as llama.cpp tokenizes a rendered chat prompt: special-token strings parsed into their
    ids and the text between them tokenized piece by piece (a SentencePiece tokenizer puts its dummy-prefix space
    at the start of each piece, as llama.cpp does), BOS put first when the file says ``add_bos_token`` (a BOS the
    template wrote itself is then dropped, not doubled)."""
    from finetune_sdk.data.encoding import encode_run
    from finetune_sdk.exporting.chat_formats import _adds_bos
    from finetune_sdk.formatter import Segment

    adds_bos = _adds_bos(tokenizer) if adds_bos is None else adds_bos
    bos = tokenizer.bos_token or ""
    if adds_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    ids = encode_run([Segment(text)], tokenizer)
    return [tokenizer.bos_token_id, *ids] if adds_bos else ids


def training_prompt_ids(formatter: Any, tokenizer: Any, options: dict[str, Any], messages: list[dict[str, str]],
                        history_row: Callable[[list[dict[str, str]]], Any] | None = None) -> list[int]:
    """The ids training put before the last answer of ``messages``: ``prompt_segments`` for one user turn, else the
    formatter's rendering of ``history_row(messages)`` (default: a ``messages`` row) cut where its last learnt run
    (the last answer) starts."""
    from finetune_sdk.data.encoding import encode_segments

    if len(messages) == 1:
        return encode_segments(formatter.prompt_segments(messages[0]["content"], tokenizer, options), tokenizer,
                               None)["input_ids"]
    row = history_row(messages) if history_row is not None else {"messages": messages}
    segments = formatter.segments(row, tokenizer, options)
    last = max(i for i, s in enumerate(segments) if s.train and s.text)
    while last > 0 and segments[last - 1].train:
        last -= 1
    return encode_segments(segments[:last], tokenizer, None)["input_ids"]


def round_trip_cases(formatter: Any, history: bool) -> list[tuple[str, dict[str, Any], list[dict[str, str]]]]:
    """``(case, options, messages)``: one turn, one turn under a training system prompt, and (when the formatter's
    rows carry a history) two turns with and without it. A single turn is the user turn to answer; a history ends
    with the answer training learns next, after the user turn to answer."""
    single = [{"role": "user", "content": "what is blue?"}]
    cases = [("single turn", {}, single), ("system prompt", {"system_prompt": SYSTEM_PROMPT}, single)]
    if history:
        cases += [("two turns", {}, HISTORY), ("two turns, system prompt", {"system_prompt": SYSTEM_PROMPT}, HISTORY)]
    return cases


def check_chat_round_trip(formatter: Any, tokenizer: Any, use_go: bool | None = None,
                          history_row: Callable[[list[dict[str, str]]], Any] | None = None) -> int:
    """Assert the exported templates render every :func:`round_trip_cases` case as training did; return the
    number of renderings compared.

    Args:
        use_go: None runs the Go side when Go is installed.
        history_row: builds a row of the formatter from a role/content message list, for the two-turn cases;
            None: a ``messages`` row when the formatter takes one, else no two-turn case.
    """
    from finetune_sdk.exporting.chat_formats import export_chat, render_jinja

    use_go = go_available() if use_go is None else use_go
    if history_row is None and formatter.accepts(["messages"]):
        history_row = lambda messages: {"messages": messages}  # noqa: E731
    compared = 0
    for case, options, messages in round_trip_cases(formatter, history=history_row is not None):
        trained_in = formatter.chat_format(tokenizer, options)
        assert trained_in is not None, f"{formatter.name}: chat_format() must say which chat format it renders in"
        chat = export_chat(trained_in, tokenizer, system_prompt=options.get("system_prompt"))
        history = messages if len(messages) == 1 else messages[:-1]
        trained = training_prompt_ids(formatter, tokenizer, options, messages, history_row)
        if chat.raw_prompt:
            raw = llama_cpp_prompt_ids(history[-1]["content"], tokenizer)
            assert raw == trained, f"{formatter.name} ({case}): a raw prompt differs from training's"
            compared += 1
            continue
        assert chat.jinja, f"{formatter.name} ({case}): the export would write no chat template"
        jinja_text = render_jinja(chat.jinja, history, tokenizer)
        assert llama_cpp_prompt_ids(jinja_text, tokenizer) == trained, (
            f"{formatter.name} ({case}): the GGUF chat template renders {jinja_text!r}, training "
            f"{tokenizer.decode(trained)!r}")
        compared += 1
        assert chat.ollama is not None, f"{formatter.name} ({case}): the Modelfile would have no TEMPLATE"
        if use_go:
            template = chat.ollama.ollama()
            for system in dict.fromkeys([None, options.get("system_prompt")]):
                go_text = go_render(template, history, system=system)
                assert llama_cpp_prompt_ids(go_text, tokenizer) == trained, (
                    f"{formatter.name} ({case}, SYSTEM {system!r}): the Modelfile TEMPLATE renders {go_text!r}, "
                    f"training {tokenizer.decode(trained)!r}")
                compared += 1
    return compared
