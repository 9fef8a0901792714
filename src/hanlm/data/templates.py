"""Chat templates: one table of hanlm's own, and `render(messages) -> (input_ids, labels)`.

A model keeps its own chat template (`template=auto`): training, evaluation and every runtime
(chat, serve, RAG, llama.cpp and Ollama through the exported file) render the same text,
default system prompt included, exactly as `apply_chat_template` renders it. The answers to
train on are taken from `{% generation %}` markers where the template has them, and otherwise
by rendering each conversation's prefixes (`answer_spans`). hanlm's table templates mark their
answers; one is installed only for a tokenizer without a template, or when named, and then it
is saved with the model, so the model is served with the template it was trained on. The
end-of-turn token and stop ids are saved with the generation config, so a model stops where
training taught it to.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, get_args

from hanlm import IGNORE_INDEX
from hanlm.config import TemplateName


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    eot: str | None  # end-of-turn token; None = the tokenizer's EOS
    special: tuple[str, ...] = ()  # tokens the tokenizer must have as single special tokens
    bos: str | None = None  # BOS the template expects, set when the tokenizer has none


# ChatML; tools the way Qwen2.5 and Hermes render them: declared in the system turn, calls as
# `<tool_call>` JSON in the assistant's answer (inside the markers: the model learns to write
# them), results as `<tool_response>` blocks in a user turn (outside: never learned).
_TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FORMAT = (
    "\n</tools>\n\nFor each function call, return a json object with function name and"
    " arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
_CHATML = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}{%- endif -%}"
    "{{ '" + _TOOLS_SYSTEM.replace("\n", "\\n") + "' }}"
    "{%- for tool in tools -%}{{ '\\n' }}{{ tool | tojson }}{%- endfor -%}"
    "{{ '" + _TOOLS_FORMAT.replace("\n", "\\n") + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] or '' }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set call = call['function'] if call['function'] is defined else call -%}"
    "{%- if message['content'] or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{{ call['arguments'] | tojson }}{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}"
    "{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}"
    "{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- elif not (tools and loop.first and message['role'] == 'system') -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else -%}{{ message['content'] + '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)

# Llama-2 chat: the system prompt sits inside the first [INST]. The space after [/INST] is part
# of the answer, so the prompt at inference ends exactly where training's prompt ended.
_LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set msgs = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set msgs = messages -%}{%- endif -%}"
    "{%- for message in msgs -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system -%}"
    "{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content']"
    " + ' [/INST]' }}"
    "{%- else -%}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{%- else -%}{{ raise_exception('the llama2 template has no ' + message['role'] + ' role') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_ALPACA = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] + '\\n\\n' }}{%- set msgs = messages[1:] -%}"
    "{%- else -%}"
    "{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\\n\\n' }}"
    "{%- set msgs = messages -%}"
    "{%- endif -%}"
    "{%- for message in msgs -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{%- else -%}{{ raise_exception('the alpaca template has no ' + message['role'] + ' role') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate("chatml", _CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": ChatTemplate(
        "llama3",
        _LLAMA3,
        "<|eot_id|>",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
    ),
    "llama2": ChatTemplate("llama2", _LLAMA2, None, (), bos="<s>"),
    "alpaca": ChatTemplate("alpaca", _ALPACA, None, ()),
}
TEMPLATE_NAMES = get_args(TemplateName)


_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# A conversation to probe a template with: what it writes after an answer is its end of turn.
_PROBE_ANSWER = "hanlm-probe-answer"
_PROBE = [
    {"role": "user", "content": "hanlm-probe-question"},
    {"role": "assistant", "content": _PROBE_ANSWER},
]


def own_template(tokenizer: Any) -> str:
    """The chat template saved with the tokenizer ('' when it has none)."""
    existing = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(existing, dict):
        existing = existing.get("default", "")
    return existing


def has_markers(jinja: str) -> bool:
    """Whether a template marks the assistant's answers with `{% generation %}`."""
    return bool(_MARKER.search(jinja))


def resolve(tokenizer: Any, name: str) -> ChatTemplate | None:
    """The table template to install, or None to keep the tokenizer's own.

    `auto` keeps a model's own template, marked or not (answers are then found by rendering
    each conversation's prefixes, see `answer_spans`); a tokenizer without one gets chatml.
    """
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name != "auto":
        raise TemplateError(f"unknown chat template '{name}'; choose one of {TEMPLATE_NAMES}")
    return None if own_template(tokenizer) else TEMPLATES["chatml"]


def _text(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def check_renders_tools(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> None:
    """Refuse a template that would silently leave out the tools or calls it is given."""
    names = [t["function"]["name"] for t in tools or []]
    names += [
        c["function"]["name"]
        for m in messages
        for c in m.get("tool_calls") or ()
        if "function" in c
    ]
    if not names:
        return
    text = _text(tokenizer, messages, False, tools)
    lost = sorted({n for n in names if n not in text})
    if lost:
        raise TemplateError(
            f"the chat template does not render tools (it leaves out {lost}): use the model's"
            " own template if it has tool support, or template=chatml (Qwen / Hermes tool calls)"
        )


def replacement_note(tokenizer: Any, name: str) -> str | None:
    """What changes when the table template `name` replaces the tokenizer's own, or None.

    Compares the two renderings of a short conversation: where they differ, the model will
    answer prompts in the new form only, and every runtime must render the new template.
    """
    own = own_template(tokenizer)
    tpl = TEMPLATES.get(name)
    if not own or tpl is None or own == tpl.jinja:
        return None
    try:
        before = _text(tokenizer, _PROBE[:1], True)
    except Exception as e:  # a broken own template: replaced anyway, say so
        return f"the model's own chat template does not render ({e}); it is replaced by {name}"
    saved = tokenizer.chat_template
    tokenizer.chat_template = tpl.jinja
    try:
        after = _text(tokenizer, _PROBE[:1], True)
    except Exception:
        after = None
    finally:
        tokenizer.chat_template = saved
    if after == before:
        return None
    return (
        f"template={name} replaces the model's own chat template, which renders prompts"
        f" differently (own: {before!r}; {name}: {after!r}). The saved model carries {name}:"
        " every runtime (hanlm, transformers, llama.cpp, Ollama) then renders that one. Leave"
        " template=auto to keep the model's own."
    )


def _missing(tokenizer: Any, tpl: ChatTemplate) -> list[str]:
    """The tokens installing `tpl` would add to the tokenizer."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tpl.special if t not in vocab]
    if tpl.bos and tokenizer.bos_token is None and tpl.bos not in vocab:
        missing.append(tpl.bos)
    return missing


def apply_template(tokenizer: Any, name: str = "auto") -> list[str]:
    """Install the template on `tokenizer` (adding its special tokens); returns tokens added.

    `auto` keeps the tokenizer's own template when it has one. A named template replaces it;
    where the two render prompts differently, a note on stderr says so. The caller must resize
    the model's embeddings if any token was added.
    """
    tpl = resolve(tokenizer, name)
    if tpl is None:
        return []
    note = replacement_note(tokenizer, name)
    if note:
        print(f"[hanlm] note: {note}", file=sys.stderr)
    missing = _missing(tokenizer, tpl)
    special = [t for t in tpl.special if t in missing]
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": special})
    if tpl.bos and tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": tpl.bos})
    if tokenizer.eos_token is None:
        raise TemplateError(f"the {tpl.name} template needs an EOS token; the tokenizer has none")
    tokenizer.chat_template = tpl.jinja
    return missing


def require_template(tokenizer: Any, name: str, model_path: str, stage: str) -> None:
    """The template a model that must already be tuned is used with: its own under `auto`."""
    tpl = resolve(tokenizer, name)
    if tpl is None or not _missing(tokenizer, tpl):
        apply_template(tokenizer, name)
        return
    why = "has no chat template and " if name == "auto" else ""
    raise TemplateError(
        f"{model_path}: the tokenizer {why}lacks the {tpl.name} chat template's special tokens;"
        f" {stage} starts from a chat model: tune this one first (hanlm sft"
        f" template={tpl.name}), or set template= to one whose tokens it has"
    )


def _probe_eot(tokenizer: Any) -> str | None:
    """The special token the tokenizer's own template writes right after an answer, if any."""
    try:
        text = _text(tokenizer, _PROBE, False)
    except Exception:
        return None
    i = text.find(_PROBE_ANSWER)
    if i < 0:
        return None
    rest = text[i + len(_PROBE_ANSWER) :].lstrip(" ")
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    for token in sorted({*tokenizer.all_special_tokens, *added}, key=len, reverse=True):
        if token and rest.startswith(token):
            return token
    return None


def eot_token(tokenizer: Any, name: str = "auto") -> str:
    """The token that ends an assistant turn: the template's, else the tokenizer's EOS."""
    tpl = resolve(tokenizer, name)
    if tpl is not None:
        return tpl.eot or tokenizer.eos_token
    return _probe_eot(tokenizer) or tokenizer.eos_token


def stop_token_ids(tokenizer: Any, name: str = "auto") -> list[int]:
    """Ids generation must stop at: the end-of-turn token and EOS."""
    ids = [tokenizer.convert_tokens_to_ids(eot_token(tokenizer, name))]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def answer_spans(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[tuple[int, int]]:
    """Character spans of the assistant answers (end-of-turn token included) in the rendering.

    For templates without `{% generation %}` markers: each answer is what rendering the
    conversation through that answer adds to rendering the turns before it with the assistant
    prompt, cut after the end-of-turn token (a runtime stops there; what follows is prompt).
    A template that renders earlier turns differently once later turns follow (one that drops
    past reasoning, say) has no such spans and is refused.
    """
    full = _text(tokenizer, messages, False, tools)
    eot = eot_token(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _text(tokenizer, messages[:i], True, tools) if i else ""
        through = _text(tokenizer, messages[: i + 1], False, tools)
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                f"the chat template renders turn {i + 1} differently once later turns follow,"
                " so the answers to train on cannot be told apart: train with a hanlm template"
                f" ({', '.join(TEMPLATES)}) or one with {{% generation %}} markers"
            )
        answer = through[len(before) :]
        k = answer.find(eot) if eot else -1
        end = len(before) + (k + len(eot) if k >= 0 else len(answer.rstrip()))
        spans.append((len(before), end))
    return spans


def render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation, exactly as `apply_chat_template` gives them, and labels that
    keep only the assistant answers and their end-of-turn tokens.

    The answers come from the template's `{% generation %}` markers when it has them, and from
    `answer_spans` (prefix renderings) otherwise, so a model's own template trains as it is.
    An assistant turn's tool calls are part of its answer; tool results are prompt.
    """
    check_renders_tools(tokenizer, messages, tools)
    answers = any(m["role"] == "assistant" for m in messages)
    if not answers or has_markers(own_template(tokenizer)):
        out = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=answers,
            add_generation_prompt=add_generation_prompt,
        )
        ids = list(out["input_ids"])
        mask = out.get("assistant_masks") or [0] * len(ids)
        if answers and not any(mask):
            raise TemplateError("the chat template's {% generation %} markers mark no tokens")
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    spans = answer_spans(tokenizer, messages, tools)
    text = _text(tokenizer, messages, add_generation_prompt, tools)
    if not getattr(tokenizer, "is_fast", True):
        raise TemplateError(
            "a chat template without {% generation %} markers needs a fast tokenizer"
            " (tokenizer.json) to find the answers; use a hanlm template instead"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        t if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for t, (start, _) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels


def prompt_ids(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Ids of a conversation ending in the assistant's turn prompt, ready for generation,
    rendered by the tokenizer's template exactly as `apply_chat_template` renders it."""
    check_renders_tools(tokenizer, messages, tools)
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, add_generation_prompt=True
    )
    return list(out["input_ids"])
