import pytest


@pytest.fixture(scope="module")
def mochi(tmp_path_factory):
    """A pipeline-root folder with a tiny Mochi VAE and a tiny T5 (random weights), as `--mochi-path`."""
    from tests.helpers.preprocess import save_tiny_t5, save_tiny_vae

    root = tmp_path_factory.mktemp("mochi")
    save_tiny_vae(root)
    save_tiny_t5(root)
    return root
