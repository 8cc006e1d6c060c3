"""Toy base pretraining: positions with locality, resumable stages, a compact committed format."""

import torch
from safetensors.torch import load_file

from relvid.toy.drivers.base import BASE_CONFIG, STATE_NAME, new_base_model, pretrain, rope_frequencies


def test_rope_frequencies_give_each_axis_a_ladder_of_wavelengths():
    freqs = rope_frequencies(BASE_CONFIG["num_attention_heads"], BASE_CONFIG["attention_head_dim"])
    assert freqs.shape == (3, BASE_CONFIG["num_attention_heads"], BASE_CONFIG["attention_head_dim"] // 2)
    per_pair_axes = (freqs != 0).sum(dim=0)  # every rotary pair follows exactly one axis
    assert bool((per_pair_axes == 1).all())
    step = 192.0 / 8  # Mochi's spacing of neighbouring tokens on the toy 8 x 8 grid
    spatial = freqs[1:].flatten()
    spatial = spatial[spatial != 0] * step
    # at most half a turn between neighbours (locality), at least 1/16 turn over the frame
    assert float(spatial.max()) <= torch.pi + 1e-6 and float(spatial.min()) * 8 >= torch.pi / 8


def test_interrupted_pretraining_resumes_to_the_same_model(tmp_path):
    kwargs = dict(steps=4, batch_size=2, frames=1, stage="image", progress=False, save_every=0,
                  save_dtype=torch.float32)
    pretrain(tmp_path / "straight", **kwargs)
    assert pretrain(tmp_path / "resumed", stop_after=2, **kwargs) is None
    assert (tmp_path / "resumed" / STATE_NAME).is_file()
    pretrain(tmp_path / "resumed", **kwargs)
    assert not (tmp_path / "resumed" / STATE_NAME).exists()  # a finished stage leaves no state behind
    a = load_file(tmp_path / "straight" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = new_base_model(0).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it did train


def test_a_state_from_other_settings_is_refused(tmp_path):
    pretrain(tmp_path / "run", steps=4, batch_size=2, frames=1, stage="image", progress=False, stop_after=1)
    try:
        pretrain(tmp_path / "run", steps=4, batch_size=3, frames=1, stage="image", progress=False)
    except RuntimeError as err:
        assert "delete it" in str(err) and STATE_NAME in str(err)
    else:
        raise AssertionError("a state from another run was resumed")


def test_toy_base_refuses_an_image_stage_from_other_settings(tmp_path, capsys):
    from relvid.cli import main

    work = tmp_path / "work"
    pretrain(work / "image_stage", steps=2, batch_size=2, frames=1, stage="image", progress=False,
             save_dtype=torch.float32)
    code = main(["toy-base", "--out", str(tmp_path / "base"), "--work", str(work), "--image-steps", "3",
                 "--image-batch-size", "2", "--steps", "1", "--batch-size", "1", "--eval-prompts", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "image_stage" in err and "delete it or pass another --work" in err
    assert not (tmp_path / "base").exists()


def test_evaluate_only_measures_a_base_without_touching_its_weights(tmp_path, capsys):
    import json

    from relvid.cli import main

    base = tmp_path / "base"
    pretrain(base, steps=2, batch_size=2, frames=1, stage="image", progress=False)
    weights = (base / "diffusion_pytorch_model.safetensors").read_bytes()
    stages = json.loads((base / "toy_base.json").read_text())
    assert main(["toy-base", "--evaluate-only", "--out", str(base), "--eval-prompts", "1", "--threads", "1"]) == 0
    info = json.loads((base / "toy_base.json").read_text())
    assert (base / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert {k: info[k] for k in stages} == stages  # the training record is kept
    assert info["evaluation"]["videos"] == 7  # 1 unseen pair x the 7 relation verbs
    assert 0.0 <= info["evaluation"]["subject_fidelity"] <= 1.0
    assert info["evaluation_command"] == "relvid toy-base --evaluate-only --eval-prompts 1 --seed 0"
    assert "subject fidelity" in capsys.readouterr().out


def test_evaluate_only_names_a_folder_without_a_base(tmp_path, capsys):
    from relvid.cli import main

    assert main(["toy-base", "--evaluate-only", "--out", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err and "no config.json" in err
    assert not (tmp_path / "nothing").exists()


def test_a_bad_eval_prompts_count_is_refused_before_any_training(tmp_path, capsys):
    from relvid.cli import main

    base = tmp_path / "base"
    assert main(["toy-base", "--out", str(base), "--work", str(tmp_path / "work"), "--image-steps", "1",
                 "--steps", "1", "--eval-prompts", "11"]) == 2
    assert "--eval-prompts must be 0-10, got 11" in capsys.readouterr().err
    assert not base.exists() and not (tmp_path / "work").exists()
    assert main(["toy-base", "--evaluate-only", "--out", str(base), "--eval-prompts", "0"]) == 2
    assert "--eval-prompts must be 1-10, got 0" in capsys.readouterr().err
