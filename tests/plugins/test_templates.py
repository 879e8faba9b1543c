"""Shipped chat templates render what each model family documents, and train the right tokens.

The expected texts below are written by hand from each family's published prompt format:
Gemma (ai.google.dev "Gemma formatting and system instructions"; a system prompt goes before the first
user text, as Gemma 3's template does), Phi-3/3.5 and Phi-4 (their model cards), Llama 2 chat (Meta's
reference ``chat_completion``: ``[INST] <<SYS>>...<</SYS>>`` with BOS/EOS around each exchange),
DeepSeek-V2 chat (its README) and DeepSeek-V3/R1 (``<｜User｜>``/``<｜Assistant｜>``). The Mistral
variants are written from mistral-common, Mistral's reference tokenizer, and when mistral-common is
installed a second test renders the same talks with it and compares (its SentencePiece ``▁`` read as
a space, ``<0x0A>`` as a newline).
"""

from __future__ import annotations

import os

import pytest
from ft_plugins.chat_template import compile_template, load_shipped_template, shipped_template_names
from test_formats_chat import TALK, build, one, trained_runs

DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# name -> (bos, eos, rendering with the system message, rendering without it, trained runs)
EXPECTED = {
    "gemma": ("<bos>", "<eos>",
              "<bos><start_of_turn>user\nYou are terse.\n\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
              "Paris.<end_of_turn>\n<start_of_turn>user\nAnd Italy?<end_of_turn>\n<start_of_turn>model\nRome."
              "<end_of_turn>\n",
              "<bos><start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\nParis.<end_of_turn>\n"
              "<start_of_turn>user\nAnd Italy?<end_of_turn>\n<start_of_turn>model\nRome.<end_of_turn>\n",
              ["Paris.<end_of_turn>", "Rome.<end_of_turn>"]),
    "phi_3": ("<s>", "<|endoftext|>",
              "<|system|>\nYou are terse.<|end|>\n<|user|>\nCapital of France?<|end|>\n<|assistant|>\nParis.<|end|>\n"
              "<|user|>\nAnd Italy?<|end|>\n<|assistant|>\nRome.<|end|>\n",
              "<|user|>\nCapital of France?<|end|>\n<|assistant|>\nParis.<|end|>\n<|user|>\nAnd Italy?<|end|>\n"
              "<|assistant|>\nRome.<|end|>\n",
              ["Paris.<|end|>", "Rome.<|end|>"]),
    "phi_4": ("<|endoftext|>", "<|endoftext|>",
              "<|im_start|>system<|im_sep|>You are terse.<|im_end|><|im_start|>user<|im_sep|>Capital of France?"
              "<|im_end|><|im_start|>assistant<|im_sep|>Paris.<|im_end|><|im_start|>user<|im_sep|>And Italy?"
              "<|im_end|><|im_start|>assistant<|im_sep|>Rome.<|im_end|>",
              "<|im_start|>user<|im_sep|>Capital of France?<|im_end|><|im_start|>assistant<|im_sep|>Paris.<|im_end|>"
              "<|im_start|>user<|im_sep|>And Italy?<|im_end|><|im_start|>assistant<|im_sep|>Rome.<|im_end|>",
              ["Paris.<|im_end|>", "Rome.<|im_end|>"]),
    "llama2": ("<s>", "</s>",
               "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nCapital of France? [/INST] Paris. </s>"
               "<s>[INST] And Italy? [/INST] Rome. </s>",
               "<s>[INST] Capital of France? [/INST] Paris. </s><s>[INST] And Italy? [/INST] Rome. </s>",
               ["Paris. </s>", "Rome. </s>"]),
    "deepseek_v2": (DS_BOS, DS_EOS,
                    f"{DS_BOS}You are terse.\n\nUser: Capital of France?\n\nAssistant: Paris.{DS_EOS}"
                    f"User: And Italy?\n\nAssistant: Rome.{DS_EOS}",
                    f"{DS_BOS}User: Capital of France?\n\nAssistant: Paris.{DS_EOS}User: And Italy?\n\n"
                    f"Assistant: Rome.{DS_EOS}",
                    [f"Paris.{DS_EOS}", f"Rome.{DS_EOS}"]),
    "deepseek_v3": (DS_BOS, DS_EOS,
                    f"{DS_BOS}You are terse.<｜User｜>Capital of France?<｜Assistant｜>Paris.{DS_EOS}"
                    f"<｜User｜>And Italy?<｜Assistant｜>Rome.{DS_EOS}",
                    f"{DS_BOS}<｜User｜>Capital of France?<｜Assistant｜>Paris.{DS_EOS}<｜User｜>And Italy?"
                    f"<｜Assistant｜>Rome.{DS_EOS}",
                    [f"Paris.{DS_EOS}", f"Rome.{DS_EOS}"]),
    # mistral-common: InstructTokenizerV1 (tokenizer.model.v1)
    "mistral_v1": ("<s>", "</s>",
                   "<s> [INST] You are terse.\n\nCapital of France? [/INST] Paris.</s> [INST] And Italy? [/INST] Rome.</s>",
                   "<s> [INST] Capital of France? [/INST] Paris.</s> [INST] And Italy? [/INST] Rome.</s>",
                   ["Paris.</s>", "Rome.</s>"]),
    # InstructTokenizerV2/V3 (SentencePiece v2, v3): the system prompt opens the last user message
    "mistral_v2v3": ("<s>", "</s>",
                     "<s>[INST] Capital of France?[/INST] Paris.</s>[INST] You are terse.\n\nAnd Italy?[/INST] Rome.</s>",
                     "<s>[INST] Capital of France?[/INST] Paris.</s>[INST] And Italy?[/INST] Rome.</s>",
                     ["Paris.</s>", "Rome.</s>"]),
    # InstructTokenizerV3 with Tekken (tekken_240718 / tekken_240911)
    "mistral_v3_tekken": ("<s>", "</s>",
                          "<s>[INST]Capital of France?[/INST]Paris.</s>[INST]You are terse.\n\nAnd Italy?[/INST]Rome.</s>",
                          "<s>[INST]Capital of France?[/INST]Paris.</s>[INST]And Italy?[/INST]Rome.</s>",
                          ["Paris.</s>", "Rome.</s>"]),
    # InstructTokenizerV7 with Tekken
    "mistral_v7_tekken": ("<s>", "</s>",
                          "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Capital of France?[/INST]Paris.</s>"
                          "[INST]And Italy?[/INST]Rome.</s>",
                          "<s>[INST]Capital of France?[/INST]Paris.</s>[INST]And Italy?[/INST]Rome.</s>",
                          ["Paris.</s>", "Rome.</s>"]),
}


def render(name: str, messages, bos: str, eos: str, **kwargs) -> str:
    return compile_template(load_shipped_template(name)).render(
        messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=False, **kwargs)


def test_every_shipped_template_is_checked_here():
    checked = set(EXPECTED) | {"chatml", "qwen", "llama3", "mistral"}  # the last four: test_formats_chat.py
    assert set(shipped_template_names()) == checked


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_the_documented_format(name):
    bos, eos, with_system, without, _ = EXPECTED[name]
    assert render(name, TALK, bos, eos) == with_system
    assert render(name, TALK[1:], bos, eos) == without


@pytest.fixture(scope="module")
def family_tokenizer(ft_tiny_model_dir):
    """The tiny tokenizer with a family's control tokens, BOS and EOS, and no template of its own."""
    from ft_plugins.chat_template import SHIPPED_TEMPLATE_TOKENS
    from transformers import AutoTokenizer

    def make(name: str):
        bos, eos = EXPECTED[name][:2]
        tok = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
        tok.add_tokens([*SHIPPED_TEMPLATE_TOKENS[name], bos, eos, "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
                       special_tokens=True)
        tok.bos_token, tok.eos_token = bos, eos
        tok.chat_template = None
        return tok

    return make


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_trains_the_answers_and_their_end_of_turn(name, write_yaml, family_tokenizer):
    tok = family_tokenizer(name)
    bos, eos, with_system, _, runs = EXPECTED[name]
    tokenize = build(write_yaml, tok, chat_template=name)
    sample = one(tokenize, TALK)
    assert tok.decode(sample["input_ids"]) == with_system  # what the model sees is the documented text
    assert trained_runs(sample, tok) == runs


def test_template_refuses_a_tokenizer_without_its_control_tokens(write_yaml, ft_tiny_tokenizer):
    from ft.kernel.errors import FtError

    with pytest.raises(FtError, match=r"template 'gemma' writes the special token\(s\) <start_of_turn>, <end_of_turn>"):
        build(write_yaml, ft_tiny_tokenizer, chat_template="gemma")


def test_templates_refuse_roles_they_do_not_know(write_yaml, family_tokenizer):
    from ft.kernel.formats import Dropped

    for name in ("gemma", "llama2", "mistral_v7_tekken", "deepseek_v3"):
        tokenize = build(write_yaml, family_tokenizer(name), chat_template=name)
        (out,) = tokenize([{"messages": [*TALK[1:3], {"role": "tool", "content": "42"}]}])
        assert isinstance(out, Dropped) and out.reason == "template error", name


# -- mistral-common, when installed ---------------------------------------------------------------

MISTRAL_FILES = {
    "mistral_v1": ["tokenizer.model.v1"],
    "mistral_v2v3": ["mistral_instruct_tokenizer_240216.model.v2", "mistral_instruct_tokenizer_240323.model.v3"],
    "mistral_v3_tekken": ["tekken_240718.json", "tekken_240911.json"],
    "mistral_v7_tekken": ["tekken_240911.json"],
}


@pytest.mark.parametrize("name", sorted(MISTRAL_FILES))
def test_mistral_templates_match_mistral_common(name):
    pytest.importorskip("mistral_common", reason="pip install 'mistral-common[sentencepiece]' to compare")
    import mistral_common
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV7
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    data = os.path.join(os.path.dirname(mistral_common.__file__), "data")
    for file in MISTRAL_FILES[name]:
        path = os.path.join(data, file)
        if name == "mistral_v7_tekken":
            instruct = InstructTokenizerV7(Tekkenizer.from_file(path))
        else:
            try:
                instruct = MistralTokenizer.from_file(path).instruct_tokenizer
            except ImportError as exc:  # the SentencePiece files need sentencepiece
                pytest.skip(str(exc))
        for talk in (TALK, TALK[1:]):
            if name == "mistral_v7_tekken":  # v7 keeps system messages in place
                request = InstructRequest(messages=[kinds[m["role"]](content=m["content"]) for m in talk])
            else:  # earlier versions take the system prompt apart
                system = talk[0]["content"] if talk[0]["role"] == "system" else None
                rest = talk[1:] if system else talk
                request = InstructRequest(messages=[kinds[m["role"]](content=m["content"]) for m in rest],
                                          system_prompt=system)
            encoded = instruct.encode_instruct(request)
            if getattr(encoded, "text", None) is None:
                pytest.skip("this mistral-common no longer gives the rendered text")
            reference = encoded.text.replace("▁", " ").replace("<0x0A>", "\n")
            assert render(name, talk, "<s>", "</s>") == reference, (name, file)
