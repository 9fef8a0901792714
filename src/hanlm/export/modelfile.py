"""The Ollama Modelfile written beside a GGUF: `FROM`, the chat template as Ollama's Go-template
`TEMPLATE`, `PARAMETER stop` for the stop tokens and the generation config's defaults.

A Jinja chat template cannot be translated in general, so the template is recognised instead:
each family hanlm meets (ChatML with or without a default system prompt, Llama 3, Llama 2,
Alpaca) has a Go template here and a Python function that renders exactly what that Go template
renders under Ollama (which hands a template `.System`, every system message joined by a blank
line, and `.Messages`, consecutive messages of one role merged). A family is used only if that
rendering equals `apply_chat_template` on every probe conversation; otherwise the Modelfile has
no TEMPLATE and a warning says why. tests/stages/test_modelfile.py renders the Go templates with
Go's own text/template and compares them with `apply_chat_template`.

Ollama adds BOS when it tokenizes (as llama.cpp does, from the GGUF's add_bos flag), so a
template's leading BOS is left to the tokenizer when the GGUF sets add_bos, and written out
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hanlm.runs import atomic_write_text

PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "你好，请介绍一下自己。"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "再加一呢？"},
    ],
    [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ],
]
# generation_config key -> Ollama PARAMETER name (sampling keys only when do_sample is true)
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p"}
ALWAYS = {"repetition_penalty": "repeat_penalty", "max_new_tokens": "num_predict"}


@dataclass
class Modelfile:
    text: str
    family: str = ""  # the template family used; "" = no TEMPLATE
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Family:
    """One template family, filled in for a tokenizer: the text its Go template starts with
    (BOS when the tokenizer will not add it), its BOS and EOS texts and default system prompt."""

    name: str
    lead: str
    bos: str
    eos: str
    default_system: str = ""

    def go(self) -> str:
        """The Go template for Ollama."""
        s = self.default_system
        if self.name == "chatml":
            default = f"<|im_start|>system\n{s}<|im_end|>\n" if s else ""
            return (
                f"{self.lead}{{{{ if .System }}}}<|im_start|>system\n{{{{ .System }}}}<|im_end|>\n"
                f"{{{{ else }}}}{default}{{{{ end }}}}"
                '{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n'
                "{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"
            )
        if self.name == "llama3":
            return (
                f"{self.lead}{{{{ range .Messages }}}}<|start_header_id|>{{{{ .Role }}}}"
                "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        if self.name == "llama2":
            return (
                '{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}'
                f"{{{{ if $first }}}}{self.lead}[INST] {{{{ if $.System }}}}<<SYS>>\n"
                "{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
                f"{{{{ $first = false }}}}{{{{ else }}}}{self.bos}[INST] {{{{ .Content }}}} [/INST]"
                '{{ end }}{{ else if eq .Role "assistant" }} '
                f"{{{{ .Content }}}}{self.eos}{{{{ end }}}}{{{{ end }}}}"
            )
        # alpaca
        return (
            f"{self.lead}{{{{ if .System }}}}{{{{ .System }}}}{{{{ else }}}}{s}{{{{ end }}}}\n\n"
            '{{ range .Messages }}{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
            '### Response:\n{{ else if eq .Role "assistant" }}'
            f"{{{{ .Content }}}}{self.eos}\n\n{{{{ end }}}}{{{{ end }}}}"
        )

    def render(self, messages: list[dict[str, str]]) -> str:
        """What `go()` renders under Ollama for `messages` (a conversation ending with a user
        turn), in Python."""
        system, msgs = collate(messages)
        turns = [m for m in msgs if m["role"] != "system"]
        if self.name == "chatml":
            sys_text = system or self.default_system
            out = f"<|im_start|>system\n{sys_text}<|im_end|>\n" if sys_text else ""
            out += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
            return self.lead + out + "<|im_start|>assistant\n"
        if self.name == "llama3":
            out = "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                for m in msgs
            )
            return self.lead + out + "<|start_header_id|>assistant<|end_header_id|>\n\n"
        if self.name == "llama2":
            out, first = "", True
            for m in turns:
                if m["role"] == "user" and first:
                    sys_part = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
                    out += f"{self.lead}[INST] {sys_part}{m['content']} [/INST]"
                    first = False
                elif m["role"] == "user":
                    out += f"{self.bos}[INST] {m['content']} [/INST]"
                else:
                    out += f" {m['content']}{self.eos}"
            return out
        out = self.lead + (system or self.default_system) + "\n\n"
        for m in turns:
            if m["role"] == "user":
                out += f"### Instruction:\n{m['content']}\n\n### Response:\n"
            else:
                out += f"{m['content']}{self.eos}\n\n"
        return out


def collate(messages: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    """Ollama's view of a conversation: every system message joined by a blank line (its
    `.System`), and the messages with consecutive ones of one role merged (its `.Messages`)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    merged: list[dict[str, str]] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {
                "role": m["role"],
                "content": merged[-1]["content"] + "\n\n" + m["content"],
            }
        else:
            merged.append({"role": m["role"], "content": m["content"]})
    return system, merged


def _hf(tok: Any, messages: list[dict[str, str]]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _family(tok: Any, add_bos: bool) -> Family | None:
    """The family the tokenizer's template looks like, with its default system prompt read off a
    rendered conversation (None: no known family)."""
    tpl = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else ""
    bos, eos = tok.bos_token or "", tok.eos_token or ""
    lead = "" if add_bos else bos
    if "<|im_start|>" in tpl:
        text = _hf(tok, [{"role": "user", "content": "Q"}])
        head = "<|im_start|>system\n"
        default = ""
        if text.startswith(head) and "<|im_end|>" in text:
            default = text[len(head) : text.index("<|im_end|>")]
        return Family("chatml", "", bos, eos, default)
    if "<|start_header_id|>" in tpl:
        return Family("llama3", lead, bos, eos)
    if "[INST]" in tpl:
        return Family("llama2", lead, bos, eos)
    if "### Instruction" in tpl:
        text = _hf(tok, [{"role": "user", "content": "Q"}])
        default = text[: text.find("### Instruction")].removesuffix("\n\n")
        return Family("alpaca", "", bos, eos, default)
    return None


def translate(tok: Any, add_bos: bool) -> tuple[Family | None, str]:
    """The family whose Go template renders what the tokenizer's chat template renders on every
    probe conversation, or None and why not."""
    if not isinstance(getattr(tok, "chat_template", None), str):
        return None, "the tokenizer has no chat template"
    fam = _family(tok, add_bos)
    if fam is None:
        return None, (
            "the chat template is none of the families hanlm translates (ChatML, Llama 3,"
            " Llama 2, Alpaca)"
        )
    prefix = tok.bos_token or "" if add_bos else ""
    for conv in PROBES:
        try:
            want = _hf(tok, conv)
        except Exception:
            if any(m["role"] == "system" for m in conv):
                continue
            raise
        got = prefix + fam.render(conv)
        if prefix and got == prefix + want:
            return None, (
                f"the GGUF adds BOS {prefix!r} (add_bos) but the chat template renders none, so"
                " llama.cpp and Ollama would see one more token than transformers"
            )
        if got != want:
            return None, (
                f"the chat template looks like {fam.name} but renders {want!r} where the"
                f" {fam.name} translation renders {got!r}"
            )
    return fam, ""


def _parameters(generation_config: Any) -> list[str]:
    if generation_config is None:
        return []
    diff = generation_config.to_diff_dict()
    lines = []
    if generation_config.do_sample:
        lines += [f"PARAMETER {o} {diff[k]}" for k, o in SAMPLING.items() if k in diff]
    else:
        lines += [
            "# the generation config decodes greedily (do_sample is false)",
            "PARAMETER temperature 0",
        ]
    lines += [f"PARAMETER {o} {diff[k]}" for k, o in ALWAYS.items() if k in diff]
    return lines


def modelfile_text(
    gguf_name: str, tok: Any, stops: list[int], add_bos: bool, generation_config: Any = None
) -> Modelfile:
    """The Modelfile for `gguf_name` (in the same directory)."""
    warnings = []
    lines = [
        "# Ollama Modelfile written by hanlm export: `ollama create NAME -f Modelfile`",
        f"FROM ./{gguf_name}",
    ]
    fam, why = translate(tok, add_bos)
    if fam is not None:
        lines.append(f'TEMPLATE """{fam.go()}"""')
    else:
        warnings.append(f"no TEMPLATE written: {why}; Ollama will send prompts verbatim")
    for i in stops:
        text = tok.convert_ids_to_tokens(int(i))
        if text and '"' not in text and "\n" not in text:
            lines.append(f'PARAMETER stop "{text}"')
        else:
            warnings.append(f"stop id {i} ({text!r}) cannot be written as a PARAMETER stop")
    lines += _parameters(generation_config)
    return Modelfile("\n".join(lines) + "\n", fam.name if fam else "", warnings)


def write_modelfile(
    out_dir: Path, gguf_name: str, tok: Any, stops: list[int], add_bos: bool, model: Any = None
) -> Modelfile:
    """Write `Modelfile` beside the GGUF in `out_dir`."""
    mf = modelfile_text(gguf_name, tok, stops, add_bos, getattr(model, "generation_config", None))
    atomic_write_text(out_dir / "Modelfile", mf.text)
    return mf
