from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

# Tests never reach a model hub: any accidental download fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
torch.set_num_threads(min(2, torch.get_num_threads()))

if TYPE_CHECKING:  # the fixtures import what they build on when used: a broken helper fails its users alone
    from omegaconf import DictConfig

    from relvid.data.cache import ClipCache
    from relvid.models.lora import TripletSpec
    from tests.helpers.chat_server import ChatServer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Factory ``tiny_cfg(*overrides, root=tmp_path)``: the tiny CPU training config, writing its run
    and reading its cache under ``root``; overrides as on the ``relvid train`` command line."""
    from tests.helpers import configs

    def make(*overrides: str, root: Path | None = None) -> DictConfig:
        return configs.tiny_cfg(tmp_path if root is None else root, *overrides)

    return make


@pytest.fixture
def toy_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Factory ``toy_cfg(name, *overrides)``: the tiny config on the toy codec and text encoder,
    its run in ``tmp_path / name`` (the cache stays ``tmp_path / "cache"``)."""
    from tests.helpers import configs

    def make(name: str, *overrides: str) -> DictConfig:
        return configs.toy_cfg(tmp_path, name, *overrides)

    return make


@pytest.fixture
def random_cache(tmp_path: Path) -> Callable[..., ClipCache]:
    """Factory ``random_cache(root="cache", **options)``: ``write_random_cache`` with the same options;
    a relative ``root`` lands in ``tmp_path``, an absolute one is used as it is."""
    from relvid.data.random_cache import write_random_cache

    def make(root: str | Path = "cache", **options: Any) -> ClipCache:
        return write_random_cache(tmp_path / root, **options)

    return make


@pytest.fixture
def chat_server() -> Iterator[Callable[..., ChatServer]]:
    """Factory ``chat_server(script)``: a loopback chat-completions server (see ChatServer), to run in
    a ``with`` block; any still open when the test ends is closed then."""
    from tests.helpers.chat_server import ChatServer

    made: list[ChatServer] = []

    def make(script: Sequence[tuple[str, Any]] = ()) -> ChatServer:
        made.append(ChatServer(list(script)))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def trained_adapters(tmp_path: Path) -> tuple[Path, torch.nn.Module, TripletSpec]:
    """(adapter file, model, spec): random non-zero LoRA weights for the tiny toy transformer,
    saved to ``tmp_path/run/adapters``."""
    from tests.helpers.adapters import trained_adapters

    return trained_adapters(tmp_path)
