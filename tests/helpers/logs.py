"""Reading what a run logged."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(logdir: str | Path) -> dict[str, list[float]]:
    """Every scalar tag of a TensorBoard log folder with its values in step order."""
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
