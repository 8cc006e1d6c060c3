"""Evaluation prompts: ten per relation, with subjects unlike the exemplars (animals, objects, characters).

The paper does not publish its lists; these were written for relvid and live in
relvid/resources/eval_prompts.tsv (columns: relation, index, prompt).
"""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources
from pathlib import Path

from relvid import relations
from relvid.errors import UserError

PROMPTS_PER_RELATION = 10


class PromptFileError(UserError, ValueError):
    """The packaged prompt file is malformed (a packaging bug, not a user error)."""


class PromptsFileError(UserError, ValueError):
    """A user's prompts file (one prompt per line) that is missing, unreadable or empty."""


def read_prompts_file(path: str | Path, key: str = "prompts_file") -> list[str]:
    """The non-blank lines of a prompts file, stripped; a missing file and an empty one (no prompt at all)
    are told apart, naming ``key``, the config key that gave the path."""
    path = Path(path)
    if not path.is_file():
        raise PromptsFileError(f"{key} {path} not found. Fix: give a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptsFileError(f"{key} {path}: not UTF-8 text ({err}). Fix: save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptsFileError(f"{key} {path} is empty (no non-blank line). Fix: write one prompt per line, or "
                               f"leave {key} unset to use the relation's evaluation prompts")
    return prompts


def collect_prompts(prompts: list[str] | None, prompts_file: str | Path | None, relation: str) -> list[str]:
    """The listed prompts, then the prompts file's lines; neither given: the relation's evaluation prompts."""
    out = [p for p in (prompts or []) if p.strip()]
    if prompts_file:
        out += read_prompts_file(prompts_file)
    return out or eval_prompts(relation)


def parse_eval_prompts(text: str, source: str = "eval_prompts.tsv") -> dict[str, list[str]]:
    """relation -> its prompts, from the TSV text (columns relation, index, prompt); an empty file, a missing
    column and a relation without all its indices are each named as such."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise PromptFileError(f"{source} is empty: it needs a header row 'relation<TAB>index<TAB>prompt' and "
                              f"{PROMPTS_PER_RELATION} rows per relation")
    reader = csv.DictReader(lines, delimiter="\t")
    missing = {"relation", "index", "prompt"} - set(reader.fieldnames or [])
    if missing:
        raise PromptFileError(f"{source}: header row lacks column(s) {', '.join(sorted(missing))} (expected "
                              "relation<TAB>index<TAB>prompt)")
    table: dict[str, dict[int, str]] = {}
    for row in reader:
        name = row["relation"]
        if name not in relations.registry():
            raise PromptFileError(f"{source}: unknown relation {name!r}")
        table.setdefault(name, {})[int(row["index"])] = (row["prompt"] or "").strip()
    if not table:
        raise PromptFileError(f"{source} holds a header row but no prompts")
    out = {}
    for name, by_index in table.items():
        if sorted(by_index) != list(range(PROMPTS_PER_RELATION)):
            raise PromptFileError(f"{source}: {name} needs indices 0..{PROMPTS_PER_RELATION - 1}, "
                                  f"has {sorted(by_index)}")
        out[name] = [by_index[i] for i in range(PROMPTS_PER_RELATION)]
    return out


@lru_cache(maxsize=1)
def _table() -> dict[str, list[str]]:
    text = resources.files("relvid").joinpath("resources", "eval_prompts.tsv").read_text(encoding="utf-8")
    return parse_eval_prompts(text)


def eval_prompts(relation: str) -> list[str]:
    """The ten evaluation prompts of a relation (name or alias)."""
    name = relations.resolve(relation).name
    table = _table()
    if name not in table:
        raise PromptFileError(f"eval_prompts.tsv has no prompts for {name}")
    return list(table[name])


def all_eval_prompts() -> dict[str, list[str]]:
    """Every relation's prompts, by canonical name."""
    return {name: list(prompts) for name, prompts in _table().items()}
