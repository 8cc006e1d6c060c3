"""CLIP-T / temporal consistency with a tiny random CLIP, FVD with a tiny TorchScript I3D."""

import pytest
import torch

from relvid.eval.clip_metrics import CLIPFeatures, CLIPWeightsError
from relvid.eval.fvd import I3DFeatures, I3DWeightsError, fvd, list_videos
from relvid.eval.metrics import frechet_distance
from relvid.video_io import write_mp4
from tests.helpers.tiny_models import tiny_clip_folder, tiny_i3d_file


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return CLIPFeatures.from_folder(tiny_clip_folder(tmp_path_factory.mktemp("clip")))


def random_video(seed, t=6, h=40, w=40):
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_still_video_has_temporal_consistency_one(clip):
    still = random_video(0)[:1].expand(5, -1, -1, -1)
    scores = clip.video_scores(still, "A dog is shaking hands with a cat.")
    assert scores["temporal_consistency"] == pytest.approx(1.0, abs=1e-6)
    noisy = clip.video_scores(random_video(1), "A dog is shaking hands with a cat.")
    assert noisy["temporal_consistency"] < 0.9999


def test_clip_t_is_the_cosine_of_image_and_text_features(clip):
    video = random_video(2, t=3)
    prompt = "A cat is hugging a dog on a cozy sofa."
    img = clip.image_features(video)
    txt = clip.text_features([prompt])
    expected = torch.nn.functional.cosine_similarity(img, txt).mean()
    assert clip.video_scores(video, prompt)["clip_t"] == pytest.approx(float(expected), abs=1e-6)
    assert -1.0 <= float(expected) <= 1.0
    other = clip.video_scores(video, "Two robots are carrying a metal crate together.")["clip_t"]
    assert other != pytest.approx(float(expected), abs=1e-6)  # the prompt matters


def test_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(CLIPWeightsError, match="--clip-path"):
        CLIPFeatures.from_folder(tmp_path)
    with pytest.raises(I3DWeightsError, match="--i3d-path"):
        I3DFeatures(tmp_path / "i3d.pt")


@pytest.mark.parametrize("stylegan_v", [False, True], ids=["forward(x)", "i3d_torchscript-convention"])
def test_fvd_of_video_folders(tmp_path, stylegan_v):
    i3d = I3DFeatures(tiny_i3d_file(tmp_path / "i3d.pt", stylegan_v), num_frames=4, size=32)
    assert i3d.stylegan_v == stylegan_v
    for i in range(4):
        write_mp4(tmp_path / "ref" / f"r{i}.mp4", random_video(10 + i, t=5, h=24, w=32))
        write_mp4(tmp_path / "same" / f"s{i}.mp4", random_video(10 + i, t=5, h=24, w=32))
        write_mp4(tmp_path / "dark" / f"d{i}.mp4", random_video(20 + i, t=5, h=24, w=32) // 4)
    ref = list_videos(tmp_path / "ref")
    same = fvd(i3d, list_videos(tmp_path / "same"), ref)
    far = fvd(i3d, list_videos(tmp_path / "dark"), ref)
    assert far > 1e-3
    # Identical folders: zero up to the matrix square root's rounding on a rank-deficient covariance
    # (4 videos), which has reached 3e-6 here against a distance of ~1.4 for the dark folder.
    assert abs(same) <= 1e-5 * far
    # the same number from the features by hand
    from relvid.video_io import read_video

    feats = lambda files: i3d.features((str(p), read_video(p)) for p in files)  # noqa: E731
    assert far == pytest.approx(frechet_distance(feats(ref), feats(list_videos(tmp_path / "dark"))), rel=1e-9)


def test_clip_path_at_another_model_folder_names_what_it_holds(tmp_path):
    from tests.helpers.preprocess import save_tiny_vae

    save_tiny_vae(tmp_path / "mochi")  # a pipeline root: vae/ holds a diffusers AutoencoderKLMochi
    with pytest.raises(CLIPWeightsError, match=r"mochi/vae holds a diffusers 'AutoencoderKLMochi', not a CLIP"):
        CLIPFeatures.from_folder(tmp_path / "mochi" / "vae")
    with pytest.raises(CLIPWeightsError, match=r"mochi holds no config.json \(it holds vae\), not a CLIP model"):
        CLIPFeatures.from_folder(tmp_path / "mochi")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CLIPWeightsError, match="is a file"):
        CLIPFeatures.from_folder(tmp_path / "file")
