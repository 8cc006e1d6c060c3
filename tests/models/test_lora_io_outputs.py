"""Export and import refuse to replace files a user already has, unless asked to."""

import pytest
import torch

from relvid.errors import OutputExistsError
from relvid.models.adapter_file import ADAPTER_FILE_NAME, load_adapters
from relvid.models.lora_io import DIFFUSERS_WEIGHT_NAME, export_state_dict, import_reference
from tests.helpers.adapters import reference_state


def _reference_file(tmp_path):
    ref, _ = reference_state()
    path = tmp_path / "model_2000.lora.pt"
    torch.save(ref, path)
    return path


def converted_triplet(tmp_path):
    """(spec, state) of a converted reference checkpoint: a full triplet without any training."""
    import_reference(_reference_file(tmp_path), tmp_path / "src")
    spec, state, _ = load_adapters(tmp_path / "src" / ADAPTER_FILE_NAME)
    return spec, state


def test_export_state_dict_refuses_an_existing_lora_file_unless_overwrite(tmp_path):
    spec, state = converted_triplet(tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / DIFFUSERS_WEIGHT_NAME).write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match=rf"{DIFFUSERS_WEIGHT_NAME}.*--overwrite"):
        export_state_dict(state, spec, out)
    assert (out / DIFFUSERS_WEIGHT_NAME).read_bytes() == b"mine"
    assert [p.name for p in out.iterdir()] == [DIFFUSERS_WEIGHT_NAME]  # no temp folder left behind
    export_state_dict(state, spec, out, overwrite=True)
    assert (out / DIFFUSERS_WEIGHT_NAME).read_bytes() != b"mine"


@pytest.mark.parametrize("existing", [DIFFUSERS_WEIGHT_NAME, ADAPTER_FILE_NAME])
def test_import_reference_refuses_before_writing_either_file(tmp_path, existing):
    out = tmp_path / "imp"
    out.mkdir()
    (out / existing).write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match=rf"{existing}.*--overwrite"):
        import_reference(_reference_file(tmp_path), out)
    assert [p.name for p in out.iterdir()] == [existing]  # the other file was not written either
    assert (out / existing).read_bytes() == b"mine"
    import_reference(_reference_file(tmp_path), out, overwrite=True)
    assert {p.name for p in out.iterdir()} == {DIFFUSERS_WEIGHT_NAME, ADAPTER_FILE_NAME}
    assert load_adapters(out / ADAPTER_FILE_NAME)[0].placement == "QK/V"
