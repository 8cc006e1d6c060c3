"""Files written whole or not at all: every file relvid writes (checkpoints, adapters, cache clips,
videos, tables, configs) goes to a temporary file in its own folder and is renamed onto its name,
so a crash, a full disk or an interrupt leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` for a writer that takes a file name (torch.save, a
    video muxer, safetensors): when the block ends without error the file is flushed to disk and
    renamed onto ``path``; on any error, KeyboardInterrupt included, it is removed.

    The temporary file lives in the target's folder, so the rename never turns into a copy across
    file systems (a system temp folder on another disk would)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would (0666 less the
        # umask), so a LoRA written on a shared machine is readable by the others as before
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text is encoded with ``encoding``) to ``path`` whole or not at all."""
    payload = data.encode(encoding) if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def writable_folder(path: str | os.PathLike) -> str | None:
    """None when ``path`` is (or can be made) a folder this process can write a file into; otherwise
    why not, naming the part of the path that refused. Creates the folder (and its parents)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".relvid-write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{err.filename or path}: {err.strerror or err}"
    return None


def swap_in_folder(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the finished folder ``new`` at ``target`` (a checkpoint written as a folder, by DeepSpeed),
    replacing what was there by two renames in the same parent folder: a crash between them leaves
    the old folder under a dot-name and the new one under its own dot-name, never a folder holding
    files of two saves. Returns ``target``."""
    import shutil

    new, target = Path(new), Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        shutil.rmtree(old)
    return target


def read_safetensors(path: str | os.PathLike, error: type[Exception]) -> tuple[dict[str, str], dict]:
    """(metadata, tensors) of a safetensors file; ``error`` naming the file when it cannot be read
    (truncated, not safetensors). The adapter, MotionInversion and ReVersion files all read this way."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except safetensors.SafetensorError as err:
        raise error(f"{path}: not a readable safetensors file ({err})") from None
