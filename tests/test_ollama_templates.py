"""The Modelfile's Go templates render exactly what the GGUF file's Jinja chat template renders.

Ollama executes ``TEMPLATE`` with Go's ``text/template`` over ``.Messages``; this runs the same engine
(``tests/ollama_template.go``) when a Go toolchain is installed, and is skipped otherwise (Go is not a dependency of
the SDK; ``apt-get install golang-go`` brings it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from finetune_sdk.exporting.chat_formats import ALPACA, CHATML, LLAMA2, LLAMA3, detect_format, render_jinja
from finetune_sdk.testing.tiny import tiny_tokenizer

GO = shutil.which("go")
pytestmark = pytest.mark.skipif(GO is None, reason="needs a Go toolchain to run Ollama's template engine")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 1 plus 2?"},
     {"role": "assistant", "content": "3."}, {"role": "user", "content": "and 2 plus 2?"},
     {"role": "assistant", "content": "4, with a \"quote\" and\nnew line."}, {"role": "user", "content": "ok"}],
]


def go_render(template: str, messages: list[dict[str, str]], tmp_path: Path) -> str:
    payload = json.dumps({"Template": template,
                          "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOFLAGS": "", "GO111MODULE": "off"}
    done = subprocess.run([GO, "run", str(Path(__file__).with_name("ollama_template.go"))], input=payload,
                          capture_output=True, text=True, env=env, timeout=300, check=True)
    return done.stdout


@pytest.mark.parametrize("chat_format", [CHATML, LLAMA3, LLAMA2, ALPACA], ids=lambda f: f.name)
def test_go_template_renders_what_the_jinja_template_renders(chat_format, tmp_path):
    tok = tiny_tokenizer()
    conversations = CONVERSATIONS[:1] if chat_format is ALPACA else CONVERSATIONS
    for messages in conversations:
        expected = render_jinja(chat_format.jinja, messages, tok).removeprefix(tok.bos_token)
        assert go_render(chat_format.ollama, messages, tmp_path) == expected, messages
        assert chat_format.render(messages, tok) == expected
    assert chat_format is ALPACA or detect_format(chat_format.jinja, tok) is chat_format
