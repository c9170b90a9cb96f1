"""``finetune plugins init``: write a plugin package that installs and passes the contract suite as generated."""

from __future__ import annotations

import re
from pathlib import Path

from finetune_sdk.errors import ConfigError

#: The plugin kinds a scaffold can be generated for (a subset of plugin_manager.KINDS).
SCAFFOLD_KINDS = ("technique", "quantizer", "formatter")
PLUGIN_NAME = re.compile(r"^[a-z][a-z0-9-]{0,40}$")

PYPROJECT = '''[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "A finetune-sdk {kind} plugin: {name}"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["finetune-sdk"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points.finetune_sdk]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]
'''

README = '''# {dist}

A [finetune-sdk](https://pypi.org/project/finetune-sdk/) {kind} plugin registering `{name}`.

```bash
pip install -e .
finetune plugins          # lists {name} with this distribution
python -m pytest tests    # the finetune-sdk contract suite
```
'''

TECHNIQUE = '''"""{dist}: the `{name}` technique (LoRA on every linear layer, a starting point to change)."""

from finetune_sdk import hookimpl
from finetune_sdk.options import Option
from finetune_sdk.plugins.techniques.lora import LoraTechnique, lora_options

FINETUNE_SDK_PLUGIN_API = (1, 1)


class {cls}(LoraTechnique):
    """LoRA with rank 16 on all linear layers; override prepare/save/load to make it your own method."""

    name = "{name}"
    description = "LoRA r=16 on all linear layers ({dist})"
    options: tuple[Option, ...] = lora_options(16, 32, 0.05, "all-linear")


@hookimpl
def register_techniques(register):
    register({cls})
'''

QUANTIZER = '''"""{dist}: the `{name}` quantizer (4-bit FP4 through bitsandbytes, a starting point to change)."""

from finetune_sdk import hookimpl
from finetune_sdk.options import Option
from finetune_sdk.plugins.quantizers.bnb import compute_dtype, disable_cpu_repack
from finetune_sdk.quantizer import Quantizer

FINETUNE_SDK_PLUGIN_API = (1, 1)


class {cls}(Quantizer):
    """4-bit FP4 weights (bitsandbytes)."""

    name = "{name}"
    description = "4-bit FP4 weights via bitsandbytes ({dist})"
    bits = 4
    options: tuple[Option, ...] = (
        Option("compute_dtype", str, "auto", "dtype of the 4-bit matmuls", choices=("auto", "bfloat16", "float16",
                                                                                     "float32")),
    )

    def quantization_config(self, options):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                  bnb_4bit_compute_dtype=compute_dtype(options.get("compute_dtype", "auto")))

    def after_load(self, model):
        disable_cpu_repack(model)


@hookimpl
def register_quantizers(register):
    register({cls})
'''

FORMATTER = '''"""{dist}: the `{name}` formatter (question/answer rows, a starting point to change)."""

from finetune_sdk import hookimpl
from finetune_sdk.formatter import Formatter, Segment, literal_format

FINETUNE_SDK_PLUGIN_API = (1, 1)


class {cls}(Formatter):
    """Rows with `question` and `answer`: "Question: ...\\nAnswer:" is the prompt, the answer and EOS are learnt."""

    name = "{name}"
    description = "question/answer rows ({dist})"
    column_sets = (("question", "answer"),)
    column_types = {{"question": (str,), "answer": (str,)}}
    example = {{"question": "What colour is the sky?", "answer": "Blue."}}

    # Row content goes in literal segments (plain text, never control tokens); only the template's own markers,
    # such as the EOS, are written as template text.
    def segments(self, row, tokenizer, options):
        return [*literal_format("Question: {{question}}\\nAnswer:", question=row["question"]),
                *literal_format(" {{answer}}", train=True, answer=row["answer"]),
                Segment(tokenizer.eos_token or "", train=True)]

    def prompt_segments(self, prompt, tokenizer, options):
        return literal_format("Question: {{question}}\\nAnswer:", question=prompt)

    def chat_format(self, tokenizer, options):
        """The format exports write as the GGUF chat template and the Ollama TEMPLATE (the contract checks that
        they render the prompt training rendered)."""
        from finetune_sdk.exporting.chat_formats import ChatFormat

        class QuestionAnswer(ChatFormat):
            name = "{name}"
            stops = ("Question:",)
            supports_system = False

            def _jinja(self):
                return ("{{% for message in messages %}}{{% if message['role'] == 'user' %}}"
                        "{{{{ 'Question: ' + message['content'] + '\\\\nAnswer:' }}}}"
                        "{{% elif message['role'] == 'assistant' %}}{{{{ ' ' + message['content'] + eos_token + '\\\\n' }}}}"
                        "{{% endif %}}{{% endfor %}}")

            def ollama(self):
                return ('{{{{- range .Messages }}}}{{{{- if eq .Role "user" }}}}Question: {{{{ .Content }}}}\\nAnswer:'
                        '{{{{ else if eq .Role "assistant" }}}} {{{{ .Content }}}}' + self.eos + '\\n{{{{ end }}}}{{{{ end }}}}')

            def _render(self, messages):
                out = ""
                for m in messages:
                    if m["role"] == "user":
                        out += f"Question: {{m['content']}}\\nAnswer:"
                    elif m["role"] == "assistant":
                        out += f" {{m['content']}}{{self.eos}}\\n"
                return out

        return QuestionAnswer.for_tokenizer(tokenizer)


@hookimpl
def register_formatters(register):
    register({cls})
'''

TEST = '''"""The finetune-sdk contract suite, run on this plugin."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD"] = "0"  # the plugin is found through its entry point

from finetune_sdk.testing import {contract}


class Test{cls}({contract}):
    name = "{name}"
'''

MODULES = {"technique": (TECHNIQUE, "TechniqueContract"), "quantizer": (QUANTIZER, "QuantizerContract"),
           "formatter": (FORMATTER, "FormatterContract")}


def scaffold(name: str, kind: str, directory: Path) -> Path:
    """Write ``finetune-sdk-<name>/`` under ``directory``; refuse to overwrite anything. Returns its path."""
    if not PLUGIN_NAME.match(name):
        raise ConfigError(f"plugin name {name!r} must be lowercase letters, digits and '-', starting with a letter")
    if kind not in SCAFFOLD_KINDS:
        raise ConfigError(f"unknown plugin kind {kind!r}; use one of {', '.join(SCAFFOLD_KINDS)}")
    dist = f"finetune-sdk-{name}"
    module = "finetune_sdk_" + name.replace("-", "_")
    cls = "".join(part.capitalize() for part in name.split("-")) + kind.capitalize()
    root = Path(directory) / dist
    if root.exists():
        raise ConfigError(f"{root} already exists; pick another name or folder")
    template, contract = MODULES[kind]
    values = {"name": name, "dist": dist, "module": module, "cls": cls, "kind": kind, "contract": contract}
    files = {
        "pyproject.toml": PYPROJECT.format(**values),
        "README.md": README.format(**values),
        f"{module}/__init__.py": template.format(**values),
        "tests/test_contract.py": TEST.format(**values),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root
