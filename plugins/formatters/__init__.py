"""Builtin formatters: llama2-chat, chatml, chat-template, alpaca, text, classification, preference, kto and
prompt."""

from finetune_sdk.hookspecs import hookimpl
from finetune_sdk.plugins.formatters.alpaca import AlpacaFormatter
from finetune_sdk.plugins.formatters.chat import ChatMLFormatter, ChatTemplateFormatter, Llama2ChatFormatter
from finetune_sdk.plugins.formatters.classification import ClassificationFormatter
from finetune_sdk.plugins.formatters.kto import KTOFormatter
from finetune_sdk.plugins.formatters.preference import PreferenceFormatter
from finetune_sdk.plugins.formatters.prompt import PromptFormatter
from finetune_sdk.plugins.formatters.text import TextFormatter

FORMATTERS = (Llama2ChatFormatter, ChatMLFormatter, ChatTemplateFormatter, AlpacaFormatter, TextFormatter,
              ClassificationFormatter, PreferenceFormatter, KTOFormatter, PromptFormatter)


@hookimpl
def register_formatters(register):
    for formatter in FORMATTERS:
        register(formatter)
