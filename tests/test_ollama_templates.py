"""The Modelfile's Go templates render exactly what the GGUF file's Jinja chat template renders.

Ollama executes ``TEMPLATE`` with Go's ``text/template`` over ``.Messages``; this runs the same engine
(``finetune_sdk.testing.chat_contract.go_render``) when a Go toolchain is installed, and is skipped otherwise (Go is
not a dependency of the SDK; ``apt-get install golang-go`` brings it). The Jinja side of the same formats is checked
without Go in tests/test_export_chat_formats.py.
"""

from __future__ import annotations

import pytest

from finetune_sdk.exporting.chat_formats import ALPACA, CHATML, LLAMA2, LLAMA3, ChatML, detect_format, render_jinja
from finetune_sdk.testing.chat_contract import go_available, go_render
from finetune_sdk.testing.tiny import tiny_tokenizer

pytestmark = pytest.mark.skipif(not go_available(), reason="needs a Go toolchain to run Ollama's template engine")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 1 plus 2?"},
     {"role": "assistant", "content": "3."}, {"role": "user", "content": "and 2 plus 2?"},
     {"role": "assistant", "content": "4, with a \"quote\" and\nnew line."}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": "what is 1 plus 2?"}, {"role": "assistant", "content": "3."},
     {"role": "user", "content": "and 2 plus 2?"}],
]
HOSTILE_SYSTEM = "Say {{ .Content }} {% raw %} %} 'q' \"\"\" \\ back\nnew line \U0001f999 ok."
FORMATS = [CHATML, LLAMA3, LLAMA2, ALPACA, ChatML(), CHATML.replace(default_system=HOSTILE_SYSTEM),
           LLAMA3.replace(default_system="Be kind."), LLAMA2.replace(default_system="Be kind.", adds_bos=False)]


@pytest.mark.parametrize("chat_format", FORMATS,
                         ids=lambda f: f"{f.name}-{f.answer_end or 'plain'}-{f.default_system or 'nosys'}-{f.adds_bos}")
def test_go_template_renders_what_the_jinja_template_renders(chat_format):
    tok = tiny_tokenizer()
    conversations = CONVERSATIONS[:1] if chat_format.name == "alpaca" else CONVERSATIONS
    for messages in conversations:
        expected = render_jinja(chat_format.jinja(), messages, tok)
        if chat_format.adds_bos:  # llama.cpp adds BOS itself and drops the template's: the Go template leaves it out
            expected = expected.removeprefix(tok.bos_token)
        assert go_render(chat_format.ollama(), messages) == expected, messages
        assert (tok.bos_token if not chat_format.adds_bos and chat_format.starts_with_bos else "") + \
            chat_format.render(messages) == expected
    if chat_format.name != "alpaca":
        detected = detect_format(chat_format.jinja(), tok)
        assert (type(detected), detected.answer_end, detected.default_system) == \
            (type(chat_format), chat_format.answer_end, chat_format.default_system)
