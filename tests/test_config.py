import re

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


# Values that cannot mean anything (negative, NaN, infinite, zero where undefined), each refused with
# an error that starts with the key, so a user knows which line of which file to change.
IMPOSSIBLE_VALUES = [
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.betas=[-0.1,0.999]", "optim.betas"), ("optim.betas=[0.9,nan]", "optim.betas"),
    ("data.num_workers=-1", "data.num_workers"), ("seed=-1", "seed"), ("seed=73786976294838206464", "seed"),
    ("seed=4294967296", "seed"), ("optim.warmup_steps=-5", "optim.warmup_steps"), ("rcl.lambda_1=-1", "rcl.lambda_1"),
    ("rcl.lambda_1=nan", "rcl.lambda_1"), ("optim.lr=inf", "optim.lr"), ("optim.eps=0", "optim.eps"),
    ("optim.eps=-1e-8", "optim.eps"), ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.min_lr_ratio=-0.5", "optim.min_lr_ratio"), ("hmt.lambda_m=inf", "hmt.lambda_m"),
    ("lora.alpha=nan", "lora.alpha"), ("sampling.guidance_scale=inf", "sampling.guidance_scale"),
    ("preview.sampling.guidance_scale=inf", "preview.sampling.guidance_scale"),
    ("trainer.devices=abc", "trainer.devices"), ("trainer.devices=0", "trainer.devices"),
    ("trainer.devices=[0,-2]", "trainer.devices"), ("trainer.devices=true", "trainer.devices"),
    ("preview.seed=-3", "preview.seed"), ("sample.seeds=[0,-1]", "sample.seeds"),
]


@pytest.mark.parametrize("override,key", IMPOSSIBLE_VALUES)
def test_impossible_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": "):
        load_config([], [override])


REFUSED_BEFORE = ["optim.lr=nan", "sampling.guidance_scale=-2", "preview.sampling.guidance_scale=-2",
                  "preview.sampling.guidance_scale=nan", "relation_accuracy.sampling.guidance_scale=0.5",
                  "judge.repeats=0", "relation_accuracy.judge.repeats=0"]


@pytest.mark.parametrize("override", REFUSED_BEFORE)
def test_values_refused_before_stay_refused(override):
    with pytest.raises(ConfigError, match="^" + re.escape(override.split("=")[0]) + ": "):
        load_config([], [override])


@pytest.mark.parametrize("override", ["seed=4294967295", "trainer.devices=auto", "trainer.devices=2",
                                      "trainer.devices=[0,3]", "trainer.devices=-1", "trainer.devices='0,1'",
                                      "optim.betas=[0,0.999]", "optim.weight_decay=0", "data.num_workers=0",
                                      "optim.warmup_steps=0", "rcl.lambda_1=0", "optim.lr=1e3", "sample.seeds=[0,7]"])
def test_possible_values_still_load(override):
    load_config([], [override])


@pytest.mark.parametrize("section", ["judge", "relation_accuracy.judge"])
@pytest.mark.parametrize("setting", ["requests_per_minute=0", "max_retries=-1", "timeout_s=0", "timeout_s=nan",
                                     "backoff_s=-1", "max_backoff_s=-1", "temperature=-0.5", "max_tokens=0"])
def test_judge_settings_that_cannot_work_name_their_key(section, setting):
    key = f"{section}.{setting.split('=')[0]}"
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": "):
        load_config([], [f"{section}.{setting}"])


def test_judge_settings_built_in_code_are_checked_too():
    """APIJudge(JudgeConfig(...)) with requests_per_minute=0 used to divide by zero at the first request."""
    from relvid.config import JudgeConfig

    with pytest.raises(ConfigError, match=r"^judge\.requests_per_minute: "):
        JudgeConfig(kind="api", base_url="http://localhost:8000/v1", model="m", requests_per_minute=0)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "a\\b", "..", ".", "two..dots", "sp ace", "tab\tname", "émoji",
                                  ""])
def test_custom_relation_that_is_not_a_folder_name_is_refused(name):
    with pytest.raises(ConfigError, match=r"^relation: "):
        load_config([], [f"relation={name!r}" if name else "relation=''", "custom_relation=true"])


def test_custom_relation_names_that_are_folder_names_load():
    cfg = load_config([], ["relation=high-five_v2.1+x", "custom_relation=true"])
    assert cfg.output_dir == "outputs/high-five_v2.1+x"


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_gpu_accelerator_without_a_visible_gpu_is_refused(accelerator):
    import torch

    from relvid.config import check_accelerator

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here: the refusal is for machines without one")
    cfg = load_config([], [f"trainer.accelerator={accelerator}"])  # loading (printing, saving) is still allowed
    with pytest.raises(ConfigError, match=r"^trainer\.accelerator: .*no (CUDA )?GPU is visible"):
        check_accelerator(cfg)
    check_accelerator(load_config([], ["trainer.accelerator=cpu"]))
    check_accelerator(load_config([], ["trainer.accelerator=auto"]))
