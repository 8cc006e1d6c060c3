"""Evaluation prompts: ten per relation, with subjects unlike the exemplars (animals, objects, characters).

The paper does not publish its lists; these were written for relvid and live in
relvid/resources/eval_prompts.tsv (columns: relation, index, prompt).
"""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources

from relvid import relations
from relvid.errors import UserError

PROMPTS_PER_RELATION = 10


class PromptFileError(UserError, ValueError):
    """The packaged prompt file is malformed (a packaging bug, not a user error)."""


@lru_cache(maxsize=1)
def _table() -> dict[str, list[str]]:
    text = resources.files("relvid").joinpath("resources", "eval_prompts.tsv").read_text(encoding="utf-8")
    table: dict[str, dict[int, str]] = {}
    for row in csv.DictReader(text.splitlines(), delimiter="\t"):
        name = row["relation"]
        if name not in relations.registry():
            raise PromptFileError(f"eval_prompts.tsv: unknown relation {name!r}")
        table.setdefault(name, {})[int(row["index"])] = row["prompt"].strip()
    out = {}
    for name, by_index in table.items():
        if sorted(by_index) != list(range(PROMPTS_PER_RELATION)):
            raise PromptFileError(f"eval_prompts.tsv: {name} needs indices 0..{PROMPTS_PER_RELATION - 1}, "
                                  f"has {sorted(by_index)}")
        out[name] = [by_index[i] for i in range(PROMPTS_PER_RELATION)]
    return out


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
