import pytest
from omegaconf import OmegaConf

from relvid.config import ConfigError, load_config, save_config


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.optim.lr == 2e-4 and cfg.optim.weight_decay == 0.01
    assert cfg.trainer.max_steps == 2400 and cfg.optim.warmup_steps == 200
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 16 and cfg.lora.placement == "QK/V"
    assert cfg.hmt.lambda_m == 50 and cfg.rcl.lambda_1 == 0.01 and cfg.rcl.tau == 0.07
    assert (cfg.rcl.n_pos, cfg.rcl.n_neg, cfg.rcl.bank_size) == (4, 10, 64)


def test_yaml_then_overrides_in_order(tmp_path, repo_root):
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  lr: 1.0e-3\n")
    cfg = load_config([repo_root / "configs" / "train.yaml", extra], ["optim.lr=5e-5", "relation=handshake"])
    assert cfg.optim.lr == 5e-5  # the learning rate in the config is the one used
    assert cfg.relation == "shaking_hands"
    assert cfg.output_dir == "outputs/shaking_hands"


@pytest.mark.parametrize("override,key", [("optim.lrr=1", "optim.lrr"), ("optim.lr=fast", "optim.lr"),
                                          ("trainer.max_step=3", "trainer.max_step"), ("modle.path=x", "modle")])
def test_misspelt_or_mistyped_key_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [override])


def test_misspelt_key_in_a_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hmt:\n  lamda_m: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*hmt\.lamda_m"):
        load_config([bad])


BAD_VALUES = [
    ("lora.placement=QQ", "lora.placement"), ("hmt.probs=[0.5,0.6,0]", "hmt.probs"),
    ("hmt.weighting=cubic", "hmt.weighting"), ("relation=dancing", "relation"),
    ("trainer.max_steps=0", "trainer.max_steps"), ("hmt.max_sigma=1.5", "hmt.max_sigma"),
    ("trainer.progress_refresh=-1", "trainer.progress_refresh"), ("lora.frozen=[relation,wings]", "lora.frozen"),
    ("lora.frozen=[relation,subject1,subject2,ffn]", "lora.frozen"),
]


@pytest.mark.parametrize("override,key", BAD_VALUES)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [override])


def test_custom_relation_is_allowed_when_asked():
    assert load_config([], ["relation=juggling_together", "custom_relation=true"]).relation == "juggling_together"


def test_environment_fallbacks(monkeypatch):
    monkeypatch.setenv("MOCHI_PATH", "/models/mochi")
    monkeypatch.setenv("RELVID_CACHE", "/data/cache")
    cfg = load_config()
    assert cfg.model.path == "/models/mochi" and cfg.data.cache_dir == "/data/cache"
    assert load_config([], ["model.path=/elsewhere"]).model.path == "/elsewhere"


def test_saved_config_is_resolved_and_reloads(tmp_path):
    cfg = load_config([], ["relation=hug", "optim.lr=3e-4"])
    path = save_config(cfg, tmp_path / "config.yaml")
    text = path.read_text()
    assert "${" not in text and "outputs/hugging" in text
    again = load_config([path])
    assert OmegaConf.to_container(again, resolve=True) == OmegaConf.to_container(cfg, resolve=True)


def test_half_true_precision_and_masked_direct_lora_are_refused():
    with pytest.raises(ConfigError, match="bf16-mixed"):
        load_config([], ["trainer.precision=bf16-true"])
    with pytest.raises(ConfigError, match="hmt.enabled=false"):
        load_config([], ["lora.placement=direct"])
    assert load_config([], ["lora.placement=direct", "hmt.enabled=false"]).lora.placement == "direct"
    with pytest.raises(ConfigError, match="lora.frozen: the direct LoRA is a single adapter"):
        load_config([], ["lora.placement=direct", "hmt.enabled=false", "lora.frozen=[relation]"])


def test_train_yaml_sets_only_what_differs_from_the_schema(repo_root):
    """Every default lives once, in the schema: configs/train.yaml restates none of them."""
    from relvid.config import schema

    values = OmegaConf.to_container(OmegaConf.load(repo_root / "configs" / "train.yaml"))
    defaults = OmegaConf.to_container(schema())

    def restated(node, default, prefix=""):
        for key, value in (node or {}).items():
            if isinstance(value, dict):
                yield from restated(value, default[key], f"{prefix}{key}.")
            elif value == default[key]:
                yield prefix + key

    assert list(restated(values, defaults)) == []
