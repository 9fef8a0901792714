"""How a command declares itself: once, in its feature package's `__init__.py`.

    COMMANDS = (
        Command("sft", "hanlm.train.sft", "SFTConfig", "instruction-tune ...",
                resumable=True, headline="hanlm.train.headlines:sft",
                summary=("answer_loss", "stop_rate")),
    )

`hanlm.pipeline.commands` gathers every package's `COMMANDS`; the command line parses arguments
against them, the recipe runner reads `resumable`, and the report reads `headline`, `summary`,
`reports` and `plot_over_kl`. Adding a command touches its own package and nothing else.

Modules are named, not imported: importing a stage pulls in torch, and `hanlm --help` must not.

`summary` lists the keys of the stage's `hanlm.json` summary that its headline reads (each also
as `initial_KEY`, the value before training; `fnmatch` patterns such as `*/accuracy` allowed).
The headline gets the summary as a `Summary`, which refuses a key the declaration does not list,
and the stage's tests check that a run writes the declared keys (`hanlm.testing`): a key renamed
on one side fails a test instead of vanishing from the report.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any


@dataclass(frozen=True)
class Command:
    name: str  # what the user types: "sft", "reward score", "rag index"
    module: str  # module with the entry point and the config class
    config: str  # config class name in that module
    help: str  # one line for `hanlm --help`
    positional: str = ""  # config key that bare arguments fill (a list key takes several)
    usage: str = ""  # what the bare arguments are, for the usage line
    aliases: tuple[tuple[str, str], ...] = ()  # (--flag name, config key) pairs
    func: str = "run"  # the module's entry point (commands sharing a module differ here)
    resumable: bool = False  # a recipe resumes it from its last complete checkpoint
    headline: str = ""  # "module:function" filling the report's headline row from a `Summary`
    summary: tuple[str, ...] = ()  # summary keys the headline reads (see the module docstring)
    reports: tuple[str, ...] = ()  # JSON reports the stage writes beside its hanlm.json
    plot_over_kl: bool = False  # the report plots its gold and proxy scores over KL


class UndeclaredSummaryKey(LookupError):
    pass


class Summary(Mapping[str, Any]):
    """A stage's summary as its headline may read it: only the keys its `Command` declares.

    Reading an undeclared key raises `UndeclaredSummaryKey` (a defect in the headline or the
    declaration, caught by the tests); iterating yields only declared keys."""

    def __init__(self, command: str, data: Mapping[str, Any], declared: tuple[str, ...]) -> None:
        self.command = command
        self._data = dict(data)
        self._declared = declared

    def declares(self, key: str) -> bool:
        bare = key[len("initial_") :] if key.startswith("initial_") else key
        return any(fnmatchcase(k, p) for p in self._declared for k in (key, bare))

    def _check(self, key: str) -> None:
        if not self.declares(key):
            raise UndeclaredSummaryKey(
                f"the headline of `hanlm {self.command}` reads summary key {key!r}, which its"
                f" Command declaration does not list in summary={self._declared!r}"
            )

    def __getitem__(self, key: str) -> Any:
        self._check(key)
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        self._check(str(key))
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        self._check(key)
        return self._data.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._data if self.declares(k))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def missing_summary_keys(
    cmd: Command, summary: Mapping[str, Any], absent: tuple[str, ...] = ()
) -> list[str]:
    """Declared summary keys (patterns: at least one match) that `summary` lacks, leaving out
    those in `absent` (keys the run's settings do not produce)."""
    return [
        key
        for key in cmd.summary
        if key not in absent and not any(fnmatchcase(k, key) for k in summary)
    ]
