"""Block offload of the frozen transformer (model.offload=blocks): blocks wait off the GPU, each comes on
for its own forward.

Every block after the first ``resident_blocks`` keeps its frozen weights on the host, in (pinned) memory
or in a safetensors file per block under ``model.offload_dir``. A forward pre-hook puts copies of them
on the device of the block's input (the GPU) in place of the block's parameters, and the forward hook
puts the host ones back: the copies live only as long as something uses them. Outside a backward that
is the block's forward alone; in training, autograd keeps the copies a block's backward needs (weights
saved for the gradient of the input) until that backward ran, and with gradient checkpointing that is
one block at a time, recomputed in backward, which onloads it again. The parameters themselves never
change: LoRA weights injected afterwards are not offloaded (they stay where ``.to()`` put them, with
their gradients and optimizer state), and ``.to(device)`` on the model moves everything but the
offloaded weights. Without gradients (sampling) the next block is copied on a second CUDA stream while
the current one computes.
"""

from __future__ import annotations

import shutil
import tempfile
import types
import weakref
from pathlib import Path

import torch
from torch import nn

from relvid.errors import UserError

OFFLOAD_ATTR = "_relvid_block_offload"


class OffloadError(UserError, ValueError):
    """Block offload asked of a model it cannot serve as configured."""


def _slots(block: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(module, name, is_parameter) of every parameter and buffer of `block`, in a fixed order."""
    out = []
    for module in block.modules():
        out += [(module, name, True) for name, p in module._parameters.items() if p is not None]
        out += [(module, name, False) for name, b in module._buffers.items() if b is not None]
    return out


def _get(slot: tuple[nn.Module, str, bool]) -> torch.Tensor:
    module, name, is_param = slot
    return (module._parameters if is_param else module._buffers)[name]


def _put(slot: tuple[nn.Module, str, bool], tensor: torch.Tensor) -> None:
    module, name, is_param = slot
    (module._parameters if is_param else module._buffers)[name] = tensor


class OffloadedBlock:
    """One block's frozen weights off the GPU, and the hooks that bring copies on for its forward."""

    def __init__(self, block: nn.Module, index: int, folder: Path | None, pin: bool) -> None:
        self.block = block
        self.index = index
        self.slots = _slots(block)
        self.originals = [_get(s) for s in self.slots]  # the registered tensors: never replaced
        self.file = None if folder is None else folder / f"block_{index:03d}.safetensors"
        self.prefetched: tuple[torch.device, list[torch.Tensor], torch.cuda.Event | None] | None = None
        self.next: OffloadedBlock | None = None
        self.onloaded = False
        if self.file is not None:
            import safetensors.torch

            from relvid.files import atomic_path

            with atomic_path(self.file) as tmp:
                safetensors.torch.save_file({str(i): t.detach().contiguous() for i, t in enumerate(self.originals)},
                                            str(tmp))
            # the registered tensors keep shape and dtype but no storage: one element, broadcast
            for tensor in self.originals:
                tensor.data = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
        elif pin:
            for tensor in self.originals:
                tensor.data = tensor.data.pin_memory()
        # always_call: also when the forward ends early, as a checkpoint's recomputation in backward does once
        # it has what it needs (torch's early stop); the copies autograd saved stay alive where it holds them
        self.handles = [block.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                        block.register_forward_hook(self._post_forward, always_call=True)]

    @property
    def host_device(self) -> torch.device:
        return torch.device("cpu")

    def load(self, device: torch.device, non_blocking: bool = False) -> list[torch.Tensor]:
        """Copies of the block's weights on `device`, in slot order."""
        if self.file is not None:
            from safetensors import safe_open

            with safe_open(str(self.file), framework="pt", device="cpu") as f:
                tensors = [f.get_tensor(str(i)) for i in range(len(self.slots))]
            if device.type == "cuda":
                tensors = [t.pin_memory().to(device, non_blocking=non_blocking) for t in tensors]
            return tensors
        return [t.detach().to(device, non_blocking=non_blocking) for t in self.originals]

    def _prefetch(self, device: torch.device, stream: torch.cuda.Stream) -> None:
        """Start copying this block's weights to `device` on `stream` (a no-grad forward's next block)."""
        if self.prefetched is not None:
            return
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            tensors = self.load(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self.prefetched = (device, tensors, event)

    def release(self) -> None:
        """Drop copies fetched ahead of use (before the GPU is needed for something else)."""
        self.prefetched = None

    def _pre_forward(self, block: nn.Module, args: tuple, kwargs: dict):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        device = first.device if first is not None else self.host_device
        if self.file is None and device == self.originals[0].device:
            return None  # the weights are where the block runs (offload on a CPU run): nothing to move
        prefetched, self.prefetched = self.prefetched, None
        if prefetched is not None and prefetched[0] == device:
            _, tensors, event = prefetched
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            for tensor in tensors:
                tensor.record_stream(current)  # allocated on the side stream, used and freed on this one
        else:
            tensors = self.load(device, non_blocking=device.type == "cuda")
        for slot, tensor in zip(self.slots, tensors, strict=True):
            _put(slot, nn.Parameter(tensor, requires_grad=False) if slot[2] else tensor)
        self.onloaded = True
        stream = _side_stream(device)
        if stream is not None and self.next is not None and not torch.is_grad_enabled():
            self.next._prefetch(device, stream)
        return None

    def _post_forward(self, block: nn.Module, args: tuple, output):
        if self.onloaded:
            for slot, original in zip(self.slots, self.originals, strict=True):
                _put(slot, original)
            self.onloaded = False
        return output


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    if device.type != "cuda":
        return None
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class BlockOffload:
    """The offloaded blocks of one transformer (see the module's docstring)."""

    def __init__(self, blocks: list[OffloadedBlock], folder: Path | None) -> None:
        self.blocks = blocks
        self.folder = folder
        for block, following in zip(blocks, blocks[1:] + blocks[:1], strict=True):
            block.next = following if following is not block else None
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(folder), True) if folder is not None else None

    @property
    def managed(self) -> set[int]:
        """ids of the registered tensors this offload keeps off the GPU."""
        return {id(t) for b in self.blocks for t in b.originals}

    def release(self) -> None:
        for block in self.blocks:
            block.release()


def block_offload(model: nn.Module) -> BlockOffload | None:
    """The BlockOffload installed on `model` (None: its weights stay where `.to()` put them)."""
    return getattr(model, OFFLOAD_ATTR, None)


def _refuse_dtype_change(fn, dtype: torch.dtype) -> None:
    if fn(torch.empty(0, dtype=dtype)).dtype != dtype:
        raise OffloadError("the transformer's offloaded blocks cannot change dtype: set model.dtype (and "
                           "model.storage_dtype) to the dtype wanted, or model.offload=none")


def _checked_apply(dtype: torch.dtype):
    """nn.Module._apply for the whole transformer: a dtype change is refused before any module is cast, so a
    refused `.to(dtype)` leaves the model as it was (the blocks' own guard alone would refuse only after the
    modules before the first offloaded block had been cast)."""

    def _apply(self, fn, recurse=True):
        _refuse_dtype_change(fn, dtype)
        return type(self)._apply(self, fn, recurse)

    return _apply


def _guarded_apply(managed_ids: set[int]):
    """nn.Module._apply for an offloaded block: `.to(device)` / `.cuda()` move everything but the offloaded
    weights, which stay on the host; a dtype change of those is refused (they are stored as loaded)."""

    def _apply(self, fn, recurse=True):
        hidden = []
        for module in self.modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is not None and id(tensor) in managed_ids:
                        hidden.append((store, name, tensor))
        if hidden:
            _refuse_dtype_change(fn, hidden[0][2].dtype)
        for store, name, _ in hidden:
            store[name] = None  # skipped by nn.Module._apply; the order of the entries is kept
        try:
            return nn.Module._apply(self, fn, recurse)
        finally:
            for store, name, tensor in hidden:
                store[name] = tensor

    return _apply


def apply_block_offload(model: nn.Module, resident_blocks: int = 0, folder: str | Path | None = None,
                        pin: bool | None = None) -> BlockOffload:
    """Offload the weights of `model`'s transformer blocks after the first `resident_blocks` (see the module's
    docstring). Call it on the host-side model before adapters are injected and before `.to(device)`.

    `folder`: write each offloaded block to a safetensors file in a fresh subfolder of it (removed with
    the offload) and keep no copy in memory. `pin` (default: when CUDA is available): pin the host copies,
    for asynchronous copies to the GPU."""
    from relvid.models.attention import mochi_blocks

    if block_offload(model) is not None:
        raise OffloadError("block offload is already installed on this transformer")
    if resident_blocks < 0:
        raise OffloadError(f"model.resident_blocks must be >= 0, got {resident_blocks}")
    blocks = mochi_blocks(model)
    if any(p.device.type != "cpu" for b in blocks[resident_blocks:] for p in b.parameters()):
        raise OffloadError("block offload starts from a transformer on the CPU: load it there, then offload")
    pin = torch.cuda.is_available() if pin is None else pin
    where = None
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        where = Path(tempfile.mkdtemp(prefix="relvid-offload-", dir=folder))
    offloaded = [OffloadedBlock(block, i, where, pin and where is None)
                 for i, block in enumerate(blocks) if i >= resident_blocks]
    offload = BlockOffload(offloaded, where)
    guard = _guarded_apply(offload.managed)
    for item in offloaded:
        item.block._apply = types.MethodType(guard, item.block)
    if offloaded:
        model._apply = types.MethodType(_checked_apply(offloaded[0].originals[0].dtype), model)
    setattr(model, OFFLOAD_ATTR, offload)
    return offload
