"""The packaged evaluation prompts."""

import pytest

from relvid import relations
from relvid.prompts import all_eval_prompts, eval_prompts


def test_ten_distinct_prompts_for_every_relation():
    table = all_eval_prompts()
    assert set(table) == set(relations.registry())
    for name, prompts in table.items():
        assert len(prompts) == 10 and len(set(prompts)) == 10, name
        # subjects unlike the exemplars: the training prompts' "person" never appears
        assert not any("person" in p.lower() for p in prompts), name


def test_aliases_resolve():
    assert eval_prompts("handshake") == eval_prompts("shaking_hands")
    with pytest.raises(relations.UnknownRelationError):
        eval_prompts("juggling")
