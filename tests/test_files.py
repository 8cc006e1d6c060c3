"""relvid.files: how relvid replaces files and folders."""


def test_a_checkpoint_folder_is_swapped_in_whole(tmp_path):
    """DeepSpeed checkpoints are folders written file by file: the new save is staged beside the
    target and renamed over it, so no folder ever holds files of two saves."""
    from relvid.files import swap_in_folder

    target, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.staging"
    for folder, step in ((target, 1), (staging, 2)):
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "latest").write_text("checkpoint")
        (folder / "checkpoint" / "mp_rank_00_model_states.pt").write_text(f"step {step}")
    (target / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_text("only in the old save")
    swap_in_folder(staging, target)
    assert (target / "checkpoint" / "mp_rank_00_model_states.pt").read_text() == "step 2"
    assert not (target / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    (tmp_path / ".new").mkdir()
    swap_in_folder(tmp_path / ".new", tmp_path / "fresh.ckpt")  # nothing to replace
    assert (tmp_path / "fresh.ckpt").is_dir()


def test_files_are_written_with_the_mode_a_plain_open_gives(tmp_path):
    """A LoRA on a shared machine stays readable by the others: the umask decides, not mkstemp's 0600."""
    import os

    from relvid.files import atomic_write

    old = os.umask(0o022)
    try:
        assert (atomic_write(tmp_path / "a.txt", "x").stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        assert (atomic_write(tmp_path / "b.txt", "x").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
