"""The relation registry: the 26 two-person interactions of NTU RGB+D, their aliases and prompts."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from relvid.errors import UserError


class UnknownRelationError(UserError, KeyError):
    """A relation name or alias that the registry does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@dataclass(frozen=True)
class Relation:
    """One relation: canonical name, aliases, NTU action id and the prompts used for it."""

    name: str
    aliases: tuple[str, ...]
    ntu_action: str  # e.g. "A058"
    ntu_label: str
    training_prompt: str  # "A person is shaking hands with a person."
    judge_phrase: str  # the phrase put into the VLM judge's question

    @property
    def ntu_action_id(self) -> int:
        return int(self.ntu_action[1:])


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


@lru_cache(maxsize=1)
def registry() -> dict[str, Relation]:
    """All relations by canonical name, read from the packaged relations.tsv."""
    text = resources.files("relvid").joinpath("resources", "relations.tsv").read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    out: dict[str, Relation] = {}
    for row in rows:
        aliases = tuple(a.strip() for a in row["aliases"].split(",") if a.strip())
        rel = Relation(
            name=row["name"],
            aliases=aliases,
            ntu_action=row["ntu_action"],
            ntu_label=row["ntu_label"],
            training_prompt=row["training_prompt"],
            judge_phrase=row["judge_phrase"],
        )
        out[rel.name] = rel
    return out


@lru_cache(maxsize=1)
def _alias_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for rel in registry().values():
        for key in (rel.name, *rel.aliases, rel.ntu_action):
            table[_normalise(key)] = rel.name
    return table


def resolve(name: str) -> Relation:
    """Look a relation up by canonical name, alias ("handshake") or NTU action id ("A058")."""
    key = _normalise(name)
    try:
        return registry()[_alias_table()[key]]
    except KeyError:
        known = ", ".join(sorted(registry()))
        raise UnknownRelationError(
            f"unknown relation {name!r}: use one of {known} (or an alias from relvid/resources/relations.tsv)"
        ) from None


def is_known(name: str) -> bool:
    return _normalise(name) in _alias_table()
