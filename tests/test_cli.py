"""`relvid` commands end to end: train from a config, export, import, cache checks, errors."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

from relvid.cli import main
from relvid.models.adapter_file import load_adapters
from relvid.models.backbone import tiny_transformer
from relvid.models.lora import activate, inference_adapters, inject_triplet, load_adapter_state_dict
from tests.helpers.adapters import reference_state

TINY_RUN = ["trainer.max_steps=3", "trainer.checkpoint_every=3", "trainer.progress_bar=false"]


def train(tmp_path, repo_root, random_cache, *extra):
    random_cache(tmp_path / "cache", n_clips=3, relation="shaking_hands", seed=4)
    args = ["train", str(repo_root / "configs" / "tiny.yaml"), "--relation", "handshake",
            "--configs-dir", str(repo_root / "configs"), f"data.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'run'}", *TINY_RUN, *extra]
    assert main(args) == 0
    return tmp_path / "run"


def our_inference_output(adapter_file, inputs):
    spec, state, _ = load_adapters(adapter_file)
    model = tiny_transformer()  # the tiny preset's weights (configs/tiny.yaml, seed 0)
    inject_triplet(model, spec)
    load_adapter_state_dict(model, state)
    activate(model, inference_adapters(spec))
    return model(**inputs)


def test_train_then_export_loads_in_diffusers_with_identical_output(tmp_path, repo_root, random_cache):
    run = train(tmp_path, repo_root, random_cache)
    assert (run / "config.yaml").read_text().count("relation: shaking_hands") == 1
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=g), timestep=torch.tensor([700.0]),
                  encoder_attention_mask=torch.tensor([[True, True, True, False, False]]), return_dict=False)
    ours = our_inference_output(run / "adapters" / "relvid_adapters.safetensors", inputs)[0]
    for source in (run / "adapters", run / "checkpoints" / "last.ckpt"):
        out = tmp_path / f"export-{source.name}"
        assert main(["export", str(source), "--out", str(out), "--triplet"]) == 0
        pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=None,
                             text_encoder=None, tokenizer=None, transformer=tiny_transformer())
        pipe.load_lora_weights(out)
        theirs = pipe.transformer(**inputs)[0]
        assert torch.equal(ours, theirs), f"diffusers output differs after exporting {source}"
        # and the LoRA matters: without it the output is different
        assert not torch.equal(ours, tiny_transformer()(**inputs)[0])
        assert (out / "relvid_adapters.safetensors").is_file()


def test_train_reads_a_local_diffusers_folder_from_mochi_path(tmp_path, repo_root, monkeypatch, random_cache):
    tiny_transformer(seed=5).save_pretrained(tmp_path / "mochi" / "transformer")
    monkeypatch.setenv("MOCHI_PATH", str(tmp_path / "mochi"))
    run = train(tmp_path, repo_root, random_cache, "model.preset=mochi")
    assert f"path: {tmp_path / 'mochi'}" in (run / "config.yaml").read_text()


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, repo_root, capsys):
    assert main(["train", str(repo_root / "configs" / "tiny.yaml"), "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["train", str(repo_root / "configs" / "tiny.yaml"), "data.cache_dir=" + str(tmp_path / "none"),
                 f"output_dir={tmp_path / 'r'}"]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err
    (tmp_path / "junk.lora.pt").write_bytes(b"not a checkpoint")
    assert main(["import-reference", str(tmp_path / "junk.lora.pt"), "--out", str(tmp_path / "imp")]) == 2
    assert "junk.lora.pt" in capsys.readouterr().err


def test_missing_mochi_weights_are_reported_before_training(tmp_path, repo_root, capsys, random_cache):
    random_cache(n_clips=2, relation="shaking_hands", seed=4)
    code = main(["train", str(repo_root / "configs" / "tiny.yaml"), "model.preset=mochi",
                 f"model.path={tmp_path / 'nomochi'}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and "genmo/mochi-1-preview" in err and "nomochi" in err


def test_import_reference_command(tmp_path):
    ref, _ = reference_state()
    torch.save(ref, tmp_path / "model_2000.lora.pt")
    assert main(["import-reference", str(tmp_path / "model_2000.lora.pt"), "--out", str(tmp_path / "imp")]) == 0
    assert (tmp_path / "imp" / "pytorch_lora_weights.safetensors").is_file()
    spec, state, _ = load_adapters(tmp_path / "imp" / "relvid_adapters.safetensors")
    assert {k.split("/")[0] for k in state} == {"relation", "subject1", "subject2", "ffn"}


def test_validate_cache_names_the_bad_clip(tmp_path, capsys, random_cache):
    cache = random_cache(n_clips=3, seed=1)
    bad = cache.path(cache.clip_ids()[1])
    bad.write_bytes(bad.read_bytes()[:100])
    assert main(["validate-cache", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr().out
    assert cache.clip_ids()[1] in out and "2 of 3 clips valid" in out


def test_relations_resolve(capsys):
    assert main(["relations", "--resolve", "high-five"]) == 0
    assert capsys.readouterr().out.strip() == "high_five"


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sample_and_evaluate_read_the_one_schema(command, capsys):
    assert main([command, "--relation", "handshake", "--print-config", "sampling.num_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "  num_steps: 7\n" in out and "relation: shaking_hands" in out
    assert "lora:" not in out and "optim:" not in out  # only the keys this command reads
    assert main([command, "--relation", "handshake", "--print-config", "sampling.num_stepz=7"]) == 2
    err = capsys.readouterr().err
    assert "sampling.num_stepz" in err and "Did you mean: 'num_steps'" in err
    # short flags are aliases of keys, and key=value overrides win over them
    assert main([command, "--print-config", "--steps", "5", "--guidance", "3", "--seeds", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "  num_steps: 5\n" in out and "  guidance_scale: 3.0\n" in out and "  - 2\n" in out
    assert main([command, "--print-config", "--steps", "5", "sampling.num_steps=9"]) == 0
    assert "  num_steps: 9\n" in capsys.readouterr().out


def test_preprocess_prints_its_resolved_config_without_any_input(capsys):
    assert main(["preprocess", "--relation", "handshake", "--print-config", "--frames", "25"]) == 0
    out = capsys.readouterr().out
    assert "cache_dir: data/cache/shaking_hands" in out and "  frames: 25\n" in out and "preprocess:" in out
    assert main(["preprocess", "--relation", "my_own_relation", "--print-config"]) == 0  # new relations start here
    assert "relation: my_own_relation" in capsys.readouterr().out
    assert main(["preprocess", "--print-config"]) == 2
    assert "--relation" in capsys.readouterr().err


def test_train_finds_the_shipped_relation_configs_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the relation's file ships inside the package
    assert main(["train", "--relation", "handshake", "--print-config"]) == 0
    assert "cache_dir: data/cache/shaking_hands" in capsys.readouterr().out


def test_your_files_win_over_the_relation_file(tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("data:\n  cache_dir: /data/my_handshakes\n")
    assert main(["train", str(mine), "--relation", "handshake", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "cache_dir: /data/my_handshakes" in out and "output_dir: outputs/shaking_hands" in out


def test_export_and_import_refuse_to_replace_files_unless_overwrite(tmp_path, capsys):
    ref, _ = reference_state()
    torch.save(ref, tmp_path / "model_2000.lora.pt")
    assert main(["import-reference", str(tmp_path / "model_2000.lora.pt"), "--out", str(tmp_path / "imp")]) == 0
    before = (tmp_path / "imp" / "relvid_adapters.safetensors").read_bytes()
    assert main(["import-reference", str(tmp_path / "model_2000.lora.pt"), "--out", str(tmp_path / "imp")]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and ("pytorch_lora_weights" in err or "relvid_adapters" in err)
    assert (tmp_path / "imp" / "relvid_adapters.safetensors").read_bytes() == before
    assert main(["import-reference", str(tmp_path / "model_2000.lora.pt"), "--out", str(tmp_path / "imp"),
                 "--overwrite"]) == 0

    out = tmp_path / "export"
    out.mkdir()
    (out / "relvid_adapters.safetensors").write_bytes(b"mine")  # only the second file of --triplet exists
    assert main(["export", str(tmp_path / "imp"), "--out", str(out), "--triplet"]) == 2
    err = capsys.readouterr().err
    assert "relvid_adapters.safetensors" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["relvid_adapters.safetensors"]  # nothing half-done
    assert main(["export", str(tmp_path / "imp"), "--out", str(out)]) == 0  # without --triplet: no clash
    assert main(["export", str(tmp_path / "imp"), "--out", str(out)]) == 2
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "imp"), "--out", str(out), "--triplet", "--overwrite"]) == 0
    assert load_adapters(out / "relvid_adapters.safetensors")[0].placement == "QK/V"


def test_export_of_a_reference_checkpoint_points_to_import_reference(tmp_path, capsys):
    ref, _ = reference_state()
    torch.save(ref, tmp_path / "model_2000.lora.pt")
    assert main(["export", str(tmp_path / "model_2000.lora.pt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "reference" in err and "relvid import-reference" in err and "model_2000.lora.pt" in err
    assert not (tmp_path / "out").exists()
