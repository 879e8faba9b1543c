"""Dataset type `chat_template`: OpenAI-style messages rendered with a chat template.

Labels follow DESIGN.md: trained messages' contents plus the template's end-of-turn token.
The span machinery lives in :mod:`ft.chat`, so other chat formats (ShareGPT...) reuse it.
Shipped templates: ``ft_plugins/templates/*.jinja`` (chatml, llama3, mistral, qwen).
"""

from __future__ import annotations

from ft import hookimpl
from ft.chat import ChatTemplateOptions, build_chat_tokenize

FT_FEATURE = False  # essential: always active


@hookimpl
def ft_register_formats(register):
    register.add("chat_template", ChatTemplateOptions, build_chat_tokenize)
