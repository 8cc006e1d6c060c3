"""relvid's adapter file, the one home of everything about it: its name, writing, reading and
validating it, reading the adapters out of a training checkpoint, and loading any adapter source
(a .ckpt, our triplet file, a run's adapters/ folder, a diffusers LoRA file) into a transformer.

A training checkpoint is a file, or, under the DeepSpeed strategies, a folder of DeepSpeed's own
files: both are read here, every file with weights_only=True (no code in a file ever runs).

The triplet file is safetensors with every adapter's LoRA weights under "<adapter>/<module>.lora_A|B.weight"
and the TripletSpec (placement, ranks, alpha, branches) as JSON metadata, so it loads without a config.
A MotionInversion run (method=motion_inversion) writes its motion embeddings under the same name in its
own format (relvid.models.motion_inversion), and a ReVersion run (method=reversion) its relation token
(relvid.models.reversion); every reader here tells them apart by the file's metadata. A ReVersion token
changes nothing in the transformer: it conditions through the prompt, so whoever encodes the prompts
reads it with ``read_reversion`` and encodes them with ``reversion.encode_with_token``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from relvid.errors import InputNotFoundError, UserError
from relvid.files import atomic_path, read_safetensors
from relvid.models import motion_inversion, reversion
from relvid.models.lora import (
    LoRAConfigError,
    TripletSpec,
    activate,
    adapter_names,
    adapter_state_dict,
    inference_adapters,
    inject_triplet,
    load_adapter_state_dict,
)
from relvid.models.motion_inversion import (
    MotionSpec,
    apply_motion_state,
    check_state,
    is_motion_file,
    is_motion_spec_dict,
    load_motion_file,
    save_motion_file,
)
from relvid.models.reversion import (
    ReVersionSpec,
    is_reversion_file,
    is_reversion_spec_dict,
    load_reversion_file,
    save_reversion_file,
)

ADAPTER_FILE_NAME = "relvid_adapters.safetensors"
RUN_ADAPTER_FILE = Path("adapters") / ADAPTER_FILE_NAME  # where a training run writes it
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # `relvid export` / diffusers' name
FORMAT_NAME = "relvid-adapters"
FORMAT_VERSION = "1"
# "<adapter>/<module>.lora_A.weight": the keys of an adapter state (adapter_state_dict)
_STATE_KEY = re.compile(r"^(?P<adapter>[^/]+)/(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def save_adapter_state(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    spec: TripletSpec,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write adapter_state_dict-style tensors in our format (safetensors, atomic); with a MotionSpec, the
    motion embeddings in the MotionInversion format."""
    if isinstance(spec, MotionSpec):
        return save_motion_file(path, state, spec, metadata)
    if isinstance(spec, ReVersionSpec):
        return save_reversion_file(path, state, spec, metadata)
    path = Path(path)
    reserved = {"format", "version", "spec"} & set(metadata or {})
    if reserved:
        raise LoRAConfigError(f"metadata keys {sorted(reserved)} are reserved by the adapter format")
    _check_state_keys(state, spec, where="adapter state to save")
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "spec": json.dumps(spec.to_dict(), sort_keys=True)}
    for k, v in (metadata or {}).items():
        if not isinstance(v, str):
            raise LoRAConfigError(f"metadata[{k!r}] must be a string, got {type(v).__name__}")
        header[k] = v
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:  # a crash never leaves a half-written adapter file
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    return path


def save_adapters(
    path: str | os.PathLike,
    transformer: nn.Module,
    spec: TripletSpec,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save the full triplet (all adapters of `spec`) in our format."""
    return save_adapter_state(path, adapter_state_dict(transformer, adapter_names(spec)), spec, metadata)


def load_adapters(path: str | os.PathLike) -> tuple[TripletSpec, dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file: (spec, adapter_state_dict-style tensors, the extra metadata given at save)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"adapter file not found: {path}")
    header, state = read_safetensors(path, LoRAConfigError)
    if is_motion_file(path):
        raise LoRAConfigError(f"{path} is a MotionInversion file (motion embeddings, no LoRA weights): load it "
                              "with apply_adapter_source, or pass it to `relvid sample --adapters`")
    if is_reversion_file(path):
        raise LoRAConfigError(_NOT_A_TRIPLET_REVERSION.format(path=path))
    if header.get("format") != FORMAT_NAME:
        raise LoRAConfigError(
            f"{path}: not a relvid adapter file (metadata format={header.get('format')!r}, "
            f"expected {FORMAT_NAME!r}); diffusers LoRA files are loaded with MochiPipeline.load_lora_weights"
        )
    if header.get("version") != FORMAT_VERSION:
        raise LoRAConfigError(
            f"{path}: adapter format version {header.get('version')!r} is not supported (expected {FORMAT_VERSION!r})"
        )
    try:
        spec = TripletSpec.from_dict(json.loads(header["spec"]))
    except (KeyError, json.JSONDecodeError, TypeError, LoRAConfigError) as e:
        raise LoRAConfigError(f"{path}: bad 'spec' metadata ({e})") from e
    _check_state_keys(state, spec, where=str(path))
    extra = {k: v for k, v in header.items() if k not in ("format", "version", "spec")}
    return spec, state, extra


def _check_state_keys(state: dict[str, torch.Tensor], spec: TripletSpec, where: str) -> None:
    names = adapter_names(spec)
    bad = sorted(k for k in state if not (m := _STATE_KEY.match(k)) or m["adapter"] not in names)
    if bad:
        raise LoRAConfigError(
            f"{where}: keys {bad} are not '<adapter>/<module>.lora_A|B.weight' with an adapter of {names}"
        )
    absent = sorted(set(names) - {k.split("/", 1)[0] for k in state})
    if absent:
        raise LoRAConfigError(f"{where}: adapters {absent} of placement {spec.placement!r} have no weights")
    not_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if not_finite:
        raise LoRAConfigError(f"{where}: non-finite (NaN or infinite) LoRA weights in {not_finite[:3]}"
                              f"{' ...' if len(not_finite) > 3 else ''}: the run that made them diverged; "
                              "use an earlier checkpoint")


# "transformer.transformer_blocks.3.attn1.to_q.lora_A.relation.weight"
_LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.(?P<ab>lora_[AB])\.(?P<adapter>[A-Za-z0-9_]+)\.weight$")


class CheckpointError(UserError, ValueError):
    """A file that is not a readable relvid checkpoint."""


def _lora_state(tensors: dict[str, torch.Tensor], where: Path, others: bool) -> dict[str, torch.Tensor]:
    """adapter_state_dict-style LoRA tensors from a module's state ("transformer.<module>.lora_A.<adapter>.weight");
    other tensors are refused, or skipped when ``others`` (a DeepSpeed module state also holds buffers)."""
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            if others and ".lora_" not in key:
                continue
            raise CheckpointError(f"{where}: unexpected tensor {key!r} in state_dict (expected LoRA weights only)")
        state[f"{match['adapter']}/{match['module']}.{match['ab']}.weight"] = value
    if not state:
        raise CheckpointError(f"{where} holds no LoRA tensors")
    return state


def _motion_checkpoint_state(tensors: dict[str, torch.Tensor], spec: MotionSpec, where: Path) -> dict:
    """The motion embeddings of a MotionInversion run's checkpoint, keyed as in its file ("temporal.3")."""
    prefix = f"transformer.{motion_inversion.ATTR}."
    other = sorted(k for k in tensors if not k.startswith(prefix))
    if other:
        raise CheckpointError(f"{where}: unexpected tensor {other[0]!r} in state_dict (expected motion embeddings "
                              "only)")
    state = {k[len(prefix):]: v for k, v in tensors.items()}
    check_state(state, spec, str(where))
    return state


def adapters_from_checkpoint(path: str | Path) -> tuple[TripletSpec | MotionSpec, dict[str, torch.Tensor]]:
    """(spec, adapter state with keys "<adapter>/<module>.lora_{A,B}.weight") from a training checkpoint:
    a .ckpt file, or a DeepSpeed checkpoint folder. A MotionInversion run's: (MotionSpec, its embeddings)."""
    path = Path(path)
    if path.is_dir():
        return _adapters_from_deepspeed(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many kinds: report the file
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(err)})") from None
    meta = ckpt.get("relvid") if isinstance(ckpt, dict) else None
    if meta is None:
        raise CheckpointError(f"{path} has no 'relvid' section: it was not written by `relvid train`")
    if is_motion_spec_dict(meta.get("spec")):
        spec = MotionSpec.from_dict(meta["spec"])
        return spec, _motion_checkpoint_state(ckpt.get("state_dict", {}), spec, path)
    if is_reversion_spec_dict(meta.get("spec")):
        spec = ReVersionSpec.from_dict(meta["spec"])
        prefix = f"{reversion.ATTR}."
        tensors = ckpt.get("state_dict", {})
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        reversion.check_state(state, spec, str(path))
        return spec, state
    return TripletSpec.from_dict(meta["spec"]), _lora_state(ckpt.get("state_dict", {}), path, others=False)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


# --- DeepSpeed checkpoint folders ----------------------------------------------------------------------
# Under trainer.strategy=deepspeed_stage_N, Lightning has DeepSpeed write every checkpoint (step000200.ckpt,
# last.ckpt, hpc_ckpt_1.ckpt) as a folder:
#   latest                                          the tag, "checkpoint"; written after the rank's files
#   <tag>/mp_rank_00_model_states.pt                ZeRO-1/2: the trainable tensors (the LoRA) and Lightning's
#                                                   state (global_step, loops, relvid's section)
#   <tag>/zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3 instead: one per rank, each with Lightning's state
#                                                   and the LoRA as empty placeholders (it is partitioned)
#   <tag>/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   one per data-parallel rank: the optimizer state
#                                                   and the fp32 master copy of the rank's share of the LoRA
#   zero_to_fp32.py, zero_to_torch.py               DeepSpeed's own scripts (relvid never runs them)
DEEPSPEED_LATEST = "latest"
_DS_MODEL = re.compile(r"^(?:zero_pp_rank_(?P<rank>\d+)_)?mp_rank_00_model_states\.pt$")
_DS_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_00_optim_states\.pt$")


def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    """A folder DeepSpeed wrote (or began to write) a checkpoint into: a *.ckpt folder, or one holding
    DeepSpeed's 'latest' file or model states."""
    path = Path(path)
    return path.is_dir() and (path.suffix == ".ckpt" or (path / DEEPSPEED_LATEST).is_file()
                              or any(path.glob("*/*_model_states.pt")))


@dataclass(frozen=True)
class DeepSpeedCheckpoint:
    """The files of a whole DeepSpeed checkpoint folder and what its first model-states file says."""

    path: Path
    stage: int  # ZeRO stage
    world_size: int  # data-parallel ranks that wrote it
    states: Path  # rank 0's model states: Lightning's checkpoint (global_step, relvid, ...) lives here
    files: tuple[Path, ...]  # every model and optimizer file, in rank order


def _incomplete(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is an incomplete DeepSpeed checkpoint ({what}): its save was cut short or "
                           "files were removed; use another checkpoint of the run")


def _torch_load(file: Path, mmap: bool, safe_globals: Sequence = ()) -> dict:
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # zip, EOF and unpickling errors of many kinds: name the file
        raise CheckpointError(f"{file} is not readable ({_first_line(err)}); use another checkpoint of the "
                              "run") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{file} does not hold a DeepSpeed checkpoint state")
    return loaded


def open_deepspeed_checkpoint(path: str | os.PathLike, mmap: bool = True) -> tuple[DeepSpeedCheckpoint, dict]:
    """The layout of a DeepSpeed checkpoint folder, checked to be whole (its 'latest' tag, rank 0's model
    states, one optimizer file per rank), and rank 0's model states (read with weights_only=True).
    Raises CheckpointError naming what is missing or unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} not found")
    latest = path / DEEPSPEED_LATEST
    if not latest.is_file():
        raise _incomplete(path, f"no '{DEEPSPEED_LATEST}' file, which DeepSpeed writes at the end of a save")
    tag = latest.read_text(errors="replace").strip()
    if not tag or tag in (".", "..") or Path(tag).name != tag:
        raise CheckpointError(f"{latest}: {tag!r} is not a DeepSpeed checkpoint tag (a folder name)")
    tag_dir = path / tag
    if not tag_dir.is_dir():
        raise _incomplete(path, f"'latest' names {tag!r}, which is not a folder there")
    models = {m["rank"]: f for f in tag_dir.iterdir() if (m := _DS_MODEL.match(f.name))}
    optims = {int(m["rank"]): f for f in tag_dir.iterdir() if (m := _DS_OPTIM.match(f.name))}
    states = models.get(None, models.get("0"))
    if states is None:
        raise _incomplete(path, f"no mp_rank_00_model_states.pt in {tag}/")
    meta = _torch_load(states, mmap)
    if "relvid" not in meta or "global_step" not in meta:
        raise CheckpointError(f"{path} was not written by `relvid train` (no relvid section in {states.name})")
    world = int(meta.get("dp_world_size") or 1)
    stage = int(((meta.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    files = [states]
    for rank in range(world):
        if stage >= 3 and rank > 0:
            if str(rank) not in models:
                raise _incomplete(path, f"{world} ranks wrote it; zero_pp_rank_{rank}_mp_rank_00_model_states.pt "
                                        f"is missing from {tag}/")
            files.append(models[str(rank)])
        if stage >= 1:
            if rank not in optims:
                raise _incomplete(path, f"{world} ranks wrote it; zero_pp_rank_{rank}_mp_rank_00_optim_states.pt "
                                        f"is missing from {tag}/")
            files.append(optims[rank])
    return DeepSpeedCheckpoint(path, stage, world, states, tuple(files)), meta


def _deepspeed_safe_globals(path: Path) -> list:
    """The few DeepSpeed classes its optimizer files hold, allowed for weights_only reading: plain records
    (loss-scale settings, the ZeRO stage, a fragment's offset), built without running code from the file."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        raise CheckpointError(f"{path} is a DeepSpeed checkpoint folder: reading its optimizer files needs "
                              "deepspeed (pip install deepspeed)") from None
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def read_deepspeed_checkpoint(path: str | os.PathLike, mmap: bool = True) -> dict:
    """Rank 0's model states of a DeepSpeed checkpoint folder (Lightning's checkpoint: global_step, relvid,
    loops), after checking that the folder is whole and that every file in it reads with
    weights_only=True, so DeepSpeed, which reads them with pickle, meets no file that runs code."""
    layout, meta = open_deepspeed_checkpoint(path, mmap=mmap)
    allowed = _deepspeed_safe_globals(layout.path) if len(layout.files) > 1 else []
    for file in layout.files[1:]:
        _torch_load(file, mmap, allowed)
    return meta


@contextlib.contextmanager
def _weights_only_everywhere() -> Iterator[None]:
    """Every torch.load in the block reads with weights_only=True, whatever its caller asked for
    (DeepSpeed's own readers ask for pickle)."""
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _adapters_from_deepspeed(path: Path) -> tuple[TripletSpec, dict[str, torch.Tensor]]:
    layout, meta = open_deepspeed_checkpoint(path, mmap=False)
    spec = TripletSpec.from_dict(meta["relvid"]["spec"])
    if layout.stage < 3:  # the LoRA is whole in rank 0's model states, as the training module held it
        return spec, _lora_state(meta.get("module") or {}, layout.states, others=True)
    # ZeRO-3: the LoRA exists only as each rank's share of the fp32 master weights; DeepSpeed's own
    # consolidation puts it together, with every file read as weights_only
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    allowed = _deepspeed_safe_globals(path)
    tag = (path / DEEPSPEED_LATEST).read_text().strip()
    try:
        with _weights_only_everywhere(), torch.serialization.safe_globals(allowed), \
                contextlib.redirect_stdout(io.StringIO()):
            tensors = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag, exclude_frozen_parameters=True)
    except Exception as err:
        raise CheckpointError(f"{path}: DeepSpeed could not put the ZeRO-3 shards together ({_first_line(err)}); "
                              f"consolidate it with `python {path / 'zero_to_fp32.py'} {path} <out folder>` on a "
                              "machine you trust, or use the run's adapters/ folder") from None
    return spec, _lora_state(tensors, path, others=True)


DIFFUSERS_ADAPTER_NAME = "relvid_inference"
_NOT_A_TRIPLET = ("{path} holds MotionInversion motion embeddings, not LoRA weights: it has no triplet and no "
                  "diffusers LoRA form; sample it with `relvid sample --adapters {path}` (or evaluate it)")


_NOT_A_TRIPLET_REVERSION = ("{path} holds a ReVersion relation token (a text-encoder row), not LoRA weights: it has "
                             "no triplet and no diffusers LoRA form; sample it with `relvid sample --adapters {path}` "
                             "(or evaluate it)")


def _checkpoint_spec(path: Path) -> object:
    """The spec dict of a .ckpt file (read with weights_only=True); None for a folder or an unreadable file."""
    if path.is_dir():
        return None  # DeepSpeed folders: MotionInversion and ReVersion do not run under DeepSpeed
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: adapters_from_checkpoint names the problem
        return None
    return (ckpt.get("relvid") or {}).get("spec") if isinstance(ckpt, dict) else None


def _is_motion_checkpoint(path: Path) -> bool:
    """A MotionInversion run's .ckpt file."""
    return is_motion_spec_dict(_checkpoint_spec(path))


def _is_reversion_checkpoint(path: Path) -> bool:
    """A ReVersion run's .ckpt file."""
    return is_reversion_spec_dict(_checkpoint_spec(path))


def read_reversion(source: str | os.PathLike) -> tuple[ReVersionSpec, dict[str, torch.Tensor]] | None:
    """(spec, token vectors) when ``source`` (a file, a run's adapters/ folder or a .ckpt) holds a ReVersion
    token; None for any other adapter source."""
    path, kind = resolve_adapter_file(source)
    if kind == "reversion":
        spec, state, _ = load_reversion_file(path)
        return spec, state
    if kind == "checkpoint" and _is_reversion_checkpoint(path):
        return adapters_from_checkpoint(path)
    return None


@dataclass(frozen=True)
class AdapterSource:
    """Which file was loaded, in which format, and its sha256 (recorded next to every video)."""

    path: Path
    kind: str  # "checkpoint" | "relvid" | "motion" (a MotionInversion file) | "reversion" | "diffusers"
    sha256: str
    spec: TripletSpec | MotionSpec | ReVersionSpec | None  # None for a diffusers file (its peft config is in the file)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "sha256": self.sha256,
                "spec": None if self.spec is None else self.spec.to_dict()}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file; of a folder (a DeepSpeed checkpoint), the sha256 of its files' relative
    names and sha256s, in name order."""
    path = Path(path)
    if path.is_dir():
        listing = "".join(f"{f.relative_to(path).as_posix()}\t{file_sha256(f)}\n"
                          for f in sorted(path.rglob("*")) if f.is_file())
        return hashlib.sha256(listing.encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_adapter_file(source: str | os.PathLike) -> tuple[Path, str]:
    """(file, kind) for a checkpoint (a .ckpt file or DeepSpeed checkpoint folder), an adapter file or a
    folder holding one."""
    path = Path(source).expanduser()
    if path.is_dir():
        # import-reference writes both files; our triplet file carries the exact spec, so prefer it.
        for name, kind in ((ADAPTER_FILE_NAME, "relvid"), (DIFFUSERS_WEIGHT_NAME, "diffusers")):
            if (path / name).is_file():
                if kind == "relvid" and is_motion_file(path / name):
                    return path / name, "motion"
                if kind == "relvid" and is_reversion_file(path / name):
                    return path / name, "reversion"
                return path / name, kind
        if is_deepspeed_checkpoint(path):
            return path, "checkpoint"
        raise InputNotFoundError(f"{path} holds neither {ADAPTER_FILE_NAME} nor {DIFFUSERS_WEIGHT_NAME}: pass a "
                                "run's adapters/ folder, an export folder, a .ckpt or an adapter file")
    if not path.is_file():
        raise InputNotFoundError(f"adapter source not found: {path}")
    if path.suffix == ".ckpt":
        return path, "checkpoint"
    if path.suffix != ".safetensors":
        raise LoRAConfigError(f"{path}: expected a .ckpt or a .safetensors adapter file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
            genmo = any(k.startswith("blocks.") for k in f.keys())  # noqa: SIM118 (not a dict)
    except safetensors.SafetensorError as err:
        raise LoRAConfigError(f"{path}: not a readable safetensors file ({err})") from None
    if genmo and fmt not in (FORMAT_NAME, motion_inversion.FORMAT_NAME):
        raise LoRAConfigError(
            f"{path} is a LoRA in genmo's Mochi format (`relvid export --format mochi`, for ComfyUI and genmo's "
            "pipeline), which relvid does not load: pass the diffusers file of the same step "
            "(loras/<relation>_stepNNNNNN.safetensors) or the run's adapters/ folder")
    if fmt == motion_inversion.FORMAT_NAME:
        return path, "motion"
    if fmt == reversion.FORMAT_NAME:
        return path, "reversion"
    return path, "relvid" if fmt == FORMAT_NAME else "diffusers"


def read_triplet(source: str | os.PathLike) -> tuple[TripletSpec, dict]:
    """(spec, adapter state) of a relvid checkpoint, triplet file or a folder holding one."""
    path, kind = resolve_adapter_file(source)
    if kind == "diffusers":
        raise LoRAConfigError(f"{path} is a diffusers LoRA file: it holds the inference set only, not relvid's "
                              f"triplet; pass a .ckpt, a {ADAPTER_FILE_NAME} or a run's adapters/ folder")
    if kind == "motion":
        raise LoRAConfigError(_NOT_A_TRIPLET.format(path=path))
    if kind == "reversion":
        raise LoRAConfigError(_NOT_A_TRIPLET_REVERSION.format(path=path))
    if kind == "checkpoint":
        spec, state = adapters_from_checkpoint(path)
        if isinstance(spec, MotionSpec):
            raise LoRAConfigError(_NOT_A_TRIPLET.format(path=path))
        if isinstance(spec, ReVersionSpec):
            raise LoRAConfigError(_NOT_A_TRIPLET_REVERSION.format(path=path))
        _check_state_keys(state, spec, where=str(path))  # the same checks as a triplet file, NaN included
        return spec, state
    spec, state, _ = load_adapters(path)
    return spec, state


def apply_adapter_source(transformer: nn.Module, source: str | os.PathLike,
                         select: Callable[[TripletSpec], Sequence[str]] = inference_adapters) -> AdapterSource:
    """Load `source` into `transformer` (which must have no LoRAs yet), eval mode, with the adapters
    ``select(spec)`` names active: by default the inference set (relation + FFN, or the direct LoRA).
    A diffusers file holds the inference set only and is loaded as it is. A MotionInversion file or
    checkpoint has no adapters to select: its embeddings are installed, the value embedding debiased as
    its spec says (frame differencing by default). A ReVersion token leaves the transformer as it is: the
    caller encodes its prompts with it (``read_reversion``, ``reversion.encode_with_token``)."""
    path, kind = resolve_adapter_file(source)
    spec = None
    if kind == "reversion" or (kind == "checkpoint" and _is_reversion_checkpoint(path)):
        spec, _ = read_reversion(path)
    elif kind == "motion" or (kind == "checkpoint" and _is_motion_checkpoint(path)):
        if kind == "motion":
            spec, state, _ = load_motion_file(path)
        else:
            spec, state = adapters_from_checkpoint(path)
        apply_motion_state(transformer, spec, state)
    elif kind == "diffusers":
        from diffusers.loaders import Mochi1LoraLoaderMixin

        state, metadata = Mochi1LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True,
                                                                local_files_only=True)
        if not state or not all("lora" in k for k in state):
            raise LoRAConfigError(f"{path}: not a diffusers LoRA file (keys without 'lora')")
        not_finite = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
        if not_finite:
            raise LoRAConfigError(f"{path}: non-finite (NaN or infinite) LoRA weights in {not_finite[:3]}")
        Mochi1LoraLoaderMixin.load_lora_into_transformer(state, transformer, adapter_name=DIFFUSERS_ADAPTER_NAME,
                                                         metadata=metadata)
        transformer.set_adapters([DIFFUSERS_ADAPTER_NAME])
    else:
        spec, state = read_triplet(path)
        inject_triplet(transformer, spec)
        load_adapter_state_dict(transformer, state)
        activate(transformer, list(select(spec)))
    transformer.eval()  # LoRA dropout off at inference
    return AdapterSource(path=path, kind=kind, sha256=file_sha256(path), spec=spec)
