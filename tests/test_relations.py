import pytest

from relvid import relations


def test_registry_has_the_26_mutual_actions():
    reg = relations.registry()
    assert len(reg) == 26
    ids = sorted(r.ntu_action_id for r in reg.values())
    assert ids == list(range(50, 61)) + list(range(106, 121))


@pytest.mark.parametrize("alias,name", [("handshake", "shaking_hands"), ("Shaking Hands", "shaking_hands"),
                                        ("high-five", "high_five"), ("A055", "hugging"),
                                        ("rps", "rock_paper_scissors")])
def test_aliases_resolve(alias, name):
    assert relations.resolve(alias).name == name


def test_unknown_relation_lists_known_names():
    with pytest.raises(relations.UnknownRelationError, match="shaking_hands"):
        relations.resolve("handshak")


def test_every_relation_has_a_config_file(repo_root):
    for name in relations.registry():
        text = (repo_root / "configs" / "relations" / f"{name}.yaml").read_text()
        assert f"relation: {name}" in text
