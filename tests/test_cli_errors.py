"""What `relvid` prints when a command fails: a user's mistake or a refusal of the machine (a file
where a folder should be, no permission) is one line naming the file, exit code 2; a bug of ours
keeps its traceback."""

import os

import pytest

from relvid.cli import main
from relvid.config import ConfigError
from relvid.files import writable_folder
from relvid.training.run import run


def test_an_output_dir_below_a_file_is_one_line_before_any_work(tmp_path, tiny_cfg, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir: cannot write into .*afile/run \(.*afile.*Not a directory\)"):
        run(tiny_cfg(f"output_dir={tmp_path / 'afile' / 'run'}"))
    assert (tmp_path / "afile").read_text() == "x"


def test_a_folder_the_process_may_not_write_is_named(tmp_path):
    """A real permission refusal: as root every folder is writable, so a forked child drops to an
    unprivileged user first (skipped where that is impossible)."""
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    folder.chmod(0o555)
    tmp_path.chmod(0o755)
    if os.geteuid() != 0:
        assert "Permission denied" in writable_folder(folder / "run")
        return
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, str(writable_folder(folder / "run")).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    answer = os.read(read, 4096).decode()
    os.close(read)
    assert str(folder / "run") in answer and "Permission denied" in answer
    assert writable_folder(tmp_path / "ok" / "deeper") is None and (tmp_path / "ok" / "deeper").is_dir()


def test_a_refused_file_operation_is_one_line_naming_the_file(tmp_path, trained_adapters, capsys):
    adapters, _, _ = trained_adapters
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(adapters), "--out", str(tmp_path / "afile" / "lora")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relvid export: error: ") and "afile" in err[0]
    assert "Traceback" not in err[0]


def test_a_bug_keeps_its_traceback(monkeypatch):
    import relvid.commands.relations as relations

    def broken(args):
        raise ValueError("a bug, not a user's mistake")

    monkeypatch.setattr(relations, "cmd_relations", broken)  # read when the parser is built
    with pytest.raises(ValueError, match="a bug"):
        main(["relations"])


def test_a_user_error_deep_in_a_command_is_one_line(tmp_path, capsys):
    assert main(["random-cache", str(tmp_path / "cache"), "--clips", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relvid random-cache: error: ") and "--clips" in err and "\n" not in err
    assert not (tmp_path / "cache").exists()


def test_import_reference_of_a_diverged_checkpoint_names_the_file_and_writes_nothing(tmp_path, capsys):
    import torch

    from tests.helpers.adapters import reference_state

    ref, _ = reference_state(rank=4)
    key = next(iter(ref))
    ref[key] = torch.full_like(ref[key], float("nan"))
    torch.save({"state_dict": ref, "step": 1200}, tmp_path / "diverged.pt")
    assert main(["import-reference", str(tmp_path / "diverged.pt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relvid import-reference: error: ") and "diverged.pt" in err and "non-finite" in err
    assert key in err and not (tmp_path / "out").exists()


def test_resuming_with_another_lora_rank_is_one_line(tmp_path, random_cache, repo_root, capsys):
    cache = random_cache(n_clips=2, relation="shaking_hands", seed=1).root
    args = ["train", str(repo_root / "configs" / "tiny.yaml"), f"data.cache_dir={cache}",
            f"output_dir={tmp_path / 'run'}", "trainer.progress_bar=false", "trainer.checkpoint_every=1"]
    assert main([*args, "trainer.max_steps=2"]) == 0
    capsys.readouterr()
    assert main([*args, "trainer.max_steps=3", "resume=last", "lora.rank=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relvid train: error: ") and "rank" in err[0]
    assert not (tmp_path / "run" / "checkpoints" / "on_exception.ckpt").exists()



def test_a_missing_adapter_source_is_one_line(tmp_path, capsys):
    from tests.helpers.configs import TINY

    (tmp_path / "empty").mkdir()
    for source, expected in ((tmp_path / "nope.safetensors", "adapter source not found"),
                             (tmp_path / "empty", "holds neither relvid_adapters.safetensors nor")):
        assert main(["sample", "--prompt", "x", "--adapters", str(source), "--out", str(tmp_path / "s"), *TINY]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("relvid sample: error: ") and expected in err and "\n" not in err
