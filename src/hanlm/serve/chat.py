"""`hanlm chat MODEL_DIR`: a streaming terminal chat with multi-turn history.

Commands inside the chat: `/reset` clears the history, `/system TEXT` sets the system prompt
(and clears the history), `/exit` (or end of input) quits. `--prompt "..."` answers once and
exits, for scripts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from hanlm.config import InferenceModelConfig, TemplateName, opt
from hanlm.data.templates import require_template
from hanlm.generation import GenerationOptions, stream
from hanlm.modeling import load_model, load_tokenizer
from hanlm.rag.answer import RetrievalOptions, Retriever

HELP = "commands: /reset (clear history), /system TEXT (set system prompt), /exit"


@dataclass
class ChatConfig:
    model: InferenceModelConfig = opt(InferenceModelConfig, "the model directory to chat with")
    prompt: str = opt("", "answer this one prompt and exit (for scripts)")
    system: str = opt("", "system prompt")
    template: TemplateName = opt("auto", "chat template if the model has none")
    generation: GenerationOptions = field(
        default_factory=GenerationOptions, metadata={"help": "decoding options"}
    )
    retrieval: RetrievalOptions = opt(
        RetrievalOptions, "answer from a hanlm rag index: top-k passages as numbered sources"
    )


class ChatSession:
    """History plus the model; `ask()` streams one answer and records it."""

    def __init__(
        self,
        model: Any,
        tok: Any,
        opts: GenerationOptions,
        system: str = "",
        retriever: Retriever | None = None,
    ) -> None:
        self.model, self.tok, self.opts = model, tok, opts
        self.system = system
        self.history: list[dict[str, str]] = []
        self.retriever = retriever

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.history, {"role": "user", "content": user}]

    def ask(self, user: str, out: TextIO) -> str:
        # With an index, this turn carries the retrieved passages; the history keeps only the
        # question as asked (earlier turns' passages would crowd the context).
        prompt, hits = self.retriever.prompt(user) if self.retriever else (user, [])
        pieces = []
        for piece in stream(self.model, self.tok, self.messages(prompt), self.opts):
            out.write(piece)
            out.flush()
            pieces.append(piece)
        out.write("\n")
        out.flush()
        answer = "".join(pieces)
        if self.retriever is not None:
            info = self.retriever.sources(hits, answer)
            for src in info["sources"]:
                mark = "*" if src["n"] in info["cited"] else " "
                snippet = " ".join(src["text"].split())[:60]
                out.write(f" {mark}[{src['n']}] {src['id']}  {snippet}\n")
            out.flush()
        self.history += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
        return answer

    def command(self, line: str, out: TextIO) -> bool:
        """Handle a /command; False means exit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            out.write("(history cleared)\n")
        elif name == "/system":
            self.system = arg.strip()
            self.history = []
            out.write(f"(system prompt set{': ' + self.system if self.system else ' to none'})\n")
        else:
            out.write(f"unknown command {name}; {HELP}\n")
        out.flush()
        return True


def load_chat_model(cfg: ChatConfig) -> tuple[Any, Any]:

    tok = load_tokenizer(cfg.model.path)
    require_template(tok, cfg.template, cfg.model.path, "chat")
    model = load_model(cfg.model)
    model.eval()
    return model, tok


def run(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    retriever = Retriever(cfg.retrieval) if cfg.retrieval.index else None
    model, tok = load_chat_model(cfg)
    session = ChatSession(model, tok, cfg.generation, cfg.system, retriever)
    if cfg.prompt:
        session.ask(cfg.prompt, stdout)
        return 0
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"hanlm chat with {cfg.model.path}; {HELP}\n")
    while True:
        if interactive:
            stdout.write("你> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line, stdout):
                break
            continue
        if interactive:
            stdout.write("AI> ")
        session.ask(line, stdout)
    return 0
