"""The documentation: the generated command reference is current, every page is in the site's
nav, the commands the pages show exist with the keys they use, the README's relative links point
to files (and headings) that exist, and no page points to a document outside the repository.

`make docs` builds the site itself (mkdocs --strict: broken links and anchors inside docs/).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from test_readme import ROOT, check_command, commands_in, dry_run

DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
REFERENCE = DOCS / "reference" / "commands.md"


def _gen_reference():
    spec = importlib.util.spec_from_file_location(
        "gen_reference", ROOT / "scripts/gen_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_reference_is_current():
    fresh = _gen_reference().render()
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.is_file() else ""
    assert committed == fresh, (
        "docs/reference/commands.md differs from the config classes: run make docs"
    )


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config.get("strict") is True, "mkdocs.yml must build strictly"
    nav = _nav_pages(config["nav"])
    assert sorted(nav) == PAGES, (
        f"not in the nav: {sorted(set(PAGES) - set(nav))}; no such page: {sorted(set(nav) - set(PAGES))}"
    )


DOC_COMMANDS = [
    (page, argv)
    for page in PAGES
    if page != "reference/commands.md"
    for argv in commands_in((DOCS / page).read_text(encoding="utf-8"))
]


@pytest.mark.parametrize(
    "page,argv", DOC_COMMANDS, ids=lambda x: " ".join(x)[:50] if isinstance(x, list) else x
)
def test_docs_command_exists(page, argv, tmp_path, monkeypatch):
    """Each `hanlm` line of a page's shell blocks names a command and keys that exist (parsed,
    not run; a recipe is read stage by stage with --dry-run)."""
    monkeypatch.chdir(ROOT)
    if check_command(argv) == "run":
        dry_run(argv[1:], tmp_path)


# --------------------------------------------------------------------------- README links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


README_LINKS = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_links_point_to_files():
    assert README_LINKS
    bad = []
    for link in README_LINKS:
        if re.match(r"^[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = ROOT / target if target else ROOT / "README.md"
        if not path.exists():
            bad.append(f"{link}: no file {target}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            bad.append(f"{link}: no heading #{anchor} in {target or 'README.md'}")
    assert not bad, bad


# --------------------------------------------------------------------------- what pages say

OUTSIDE = re.compile(r"DESIGN\.md|METHODS\.md|STACK\.md|\bshared/")
HISTORY = re.compile(r"\b(issue|wave) \d+|\blast stop\b", re.I)


def test_pages_point_to_nothing_outside_the_repository():
    texts = [ROOT / "README.md", *DOCS.rglob("*.md"), *(ROOT / "benchmarks").glob("*.md")]
    bad = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}"
        for p in texts
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line) or HISTORY.search(line)
    ]
    assert not bad, bad
