"""The toy world's judge and metrics as a scorer of sampled videos (`relvid analyze attribution
--judge toy`): reached through `relvid.commands.toy`, so the analysis core never imports the toy world."""

from __future__ import annotations

import re

from relvid.errors import InputError
from relvid.toy.drivers.evaluate import TestPrompt, score
from relvid.toy.world import RELATIONS, Subject


class ToyScorer:
    """Relation accuracy, subject fidelity, appearance leakage and temporal consistency of videos of toy
    captions ("A red circle is orbiting a blue square.")."""

    name = "toy"
    _SUBJECTS = re.compile(r"^an? (\w+) (\w+) .*\ban? (\w+) (\w+)\.?$", re.IGNORECASE)

    def score(self, videos, prompts, relation):
        if relation not in RELATIONS:
            raise InputError(f"the toy judge scores toy relations ({', '.join(sorted(RELATIONS))}), not {relation!r}: "
                             "pass --relation with the relation the prompts show")
        tests = []
        for prompt in prompts:
            m = self._SUBJECTS.match(prompt.strip())
            if m is None:
                raise InputError(f"not a toy caption: {prompt!r} (expected 'A <colour> <shape> ... a <colour> "
                                 "<shape>.')")
            tests.append(TestPrompt(relation, Subject(m[1].lower(), m[2].lower()),
                                    Subject(m[3].lower(), m[4].lower()), 0))
        return score(videos, tests)[0]
