"""Chat templates: the one table of them, and `render(messages) -> (input_ids, labels)`.

Each template is Jinja with `{% generation %}` markers around what the assistant must learn to
write (its answer *and* its end-of-turn token), so transformers' assistant-token mask — and
with it trl's assistant-only loss — covers exactly the answers. Training, evaluation and
serving all render through `render()`, and the template, end-of-turn token and stop tokens are
saved with the tokenizer and generation config, so a model stops where training taught it to.
"""

from __future__ import annotations

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


_CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
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


def _guess(existing: str) -> str | None:
    if "<|im_start|>" in existing:
        return "chatml"
    if "<|start_header_id|>" in existing:
        return "llama3"
    if "[INST]" in existing:
        return "llama2"
    if "### Instruction" in existing:
        return "alpaca"
    return None


def resolve(tokenizer: Any, name: str) -> ChatTemplate | None:
    """The template to use; `auto` keeps a model's own template if it marks the answers.

    Returns None for `auto` when the tokenizer's template already has generation markers.
    """
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name != "auto":
        raise TemplateError(f"unknown chat template '{name}'; choose one of {TEMPLATE_NAMES}")
    existing = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(existing, dict):
        existing = existing.get("default", "")
    if "{% generation %}" in existing or "{%- generation %}" in existing:
        return None
    guess = _guess(existing)
    if guess is None:
        raise TemplateError(
            "chat_template=auto: the tokenizer has no chat template hanlm recognises;"
            f" pick one of {', '.join(TEMPLATES)}"
        )
    return TEMPLATES[guess]


def apply_template(tokenizer: Any, name: str = "auto") -> list[str]:
    """Install the template on `tokenizer` (adding its special tokens); returns tokens added.

    The caller must resize the model's embeddings if any token was added.
    """
    tpl = resolve(tokenizer, name)
    if tpl is None:
        return []
    vocab = tokenizer.get_vocab()
    missing = [t for t in tpl.special if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tpl.bos and tokenizer.bos_token is None:
        if tpl.bos not in tokenizer.get_vocab():
            missing.append(tpl.bos)
        tokenizer.add_special_tokens({"bos_token": tpl.bos})
    if tokenizer.eos_token is None:
        raise TemplateError(f"the {tpl.name} template needs an EOS token; the tokenizer has none")
    tokenizer.chat_template = tpl.jinja
    return missing


def require_template(tokenizer: Any, name: str, model_path: str, stage: str) -> None:
    """Install `name` on the tokenizer of a model that must already have been tuned with it."""
    if apply_template(tokenizer, name):
        raise TemplateError(
            f"{model_path}: the tokenizer lacks the {name} chat template's special tokens;"
            f" {stage} starts from a model tuned with that template (hanlm sft template={name})"
        )


def eot_token(tokenizer: Any, name: str = "auto") -> str:
    tpl = resolve(tokenizer, name)
    if tpl is None:
        existing = tokenizer.chat_template or ""
        guess = _guess(existing)
        tpl = TEMPLATES[guess] if guess else None
    return (tpl.eot if tpl and tpl.eot else None) or tokenizer.eos_token


def stop_token_ids(tokenizer: Any, name: str = "auto") -> list[int]:
    """Ids generation must stop at: the end-of-turn token and EOS."""
    ids = [tokenizer.convert_tokens_to_ids(eot_token(tokenizer, name))]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation, and labels that keep only the assistant turns.

    Labels are IGNORE_INDEX everywhere except the assistant answers and their end-of-turn
    tokens, taken from the template's generation markers.
    """
    out = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
    )
    ids = list(out["input_ids"])
    mask = out.get("assistant_masks") or [0] * len(ids)
    if any(m["role"] == "assistant" for m in messages) and not any(mask):
        raise TemplateError(
            "the chat template marks no assistant tokens: it needs {% generation %} markers"
        )
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return ids, labels


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Ids of a conversation ending in the assistant's turn prompt, ready for generation."""
    return render(tokenizer, messages, add_generation_prompt=True)[0]
