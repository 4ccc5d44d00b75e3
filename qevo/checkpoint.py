"""Checkpoint I/O: pytrees to msgpack files, written atomically.

A checkpoint is one file holding a pytree's state dict and a JSON-able metadata dict.
Writes go to a temporary file in the same folder, are flushed to disk, then renamed over
the target, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, TypeVar, overload

import jax
import numpy as np
from flax import serialization

from qevo.errors import CheckpointError
from qevo.files import atomic_path

T = TypeVar("T")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`qevo.files.atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_history(path: str | os.PathLike, steps: int, unit: str = "steps", step_key: str | None = None) -> list:
    """The records of a JSON-lines history up to a checkpoint after ``steps`` steps: the
    resume policy of every method.

    Without ``step_key`` a step is one line: the first ``steps`` lines, and lines after them
    (a step interrupted before its checkpoint) are dropped unread. With ``step_key`` a step
    is every record whose ``record[step_key]`` names it by its index from 0: the records of
    steps ``0 .. steps - 1``, the last of which must be there.

    Raises:
      CheckpointError: the history stops short of the checkpoint, or a line is corrupt.
    """
    path = pathlib.Path(path)
    lines = _lines(path)
    if step_key is not None:
        records = [r for r in _parse_lines(path, lines) if r[step_key] < steps]
        if steps and not any(r[step_key] == steps - 1 for r in records):
            raise CheckpointError(f"{path} has no record of {step_key} {steps - 1}, the checkpoint's last; "
                                  f"delete {path.parent} to start over")
        return records
    if len(lines) < steps:
        raise CheckpointError(f"{path} has {len(lines)} {unit}, the checkpoint {steps}; "
                              f"delete {path.parent} to start over")
    return _parse_lines(path, lines[:steps])


def write_jsonl(path: str | os.PathLike, records: list) -> None:
    """Write ``records`` as JSON lines, atomically (the history writer of every method)."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _lines(path: pathlib.Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _parse_lines(path: pathlib.Path, lines: list[str]) -> list:
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} line {number} is corrupt ({e}); delete {path.parent} to start over") from e
    return records


def save(path: str | os.PathLike, tree, meta: dict | None = None) -> None:
    """Save a pytree (arrays become numpy) and a JSON-able ``meta`` dict to ``path``."""
    state = serialization.to_state_dict(jax.device_get(tree))
    payload = {"tree": state, "meta": json.dumps(meta or {})}
    atomic_write_bytes(path, serialization.msgpack_serialize(payload))


@overload
def load(path: str | os.PathLike, target: None = None) -> tuple[dict[str, Any], dict[str, Any]]: ...
@overload
def load(path: str | os.PathLike, target: T) -> tuple[T, dict[str, Any]]: ...
def load(path, target=None):
    """Load ``(tree, meta)`` from ``path``.

    Args:
      path (str | os.PathLike): a file written by :func:`save`.
      target (pytree | None): a pytree of the expected structure (its leaves give shapes); ``None``
        returns the raw nested dict of numpy arrays.

    Raises:
      CheckpointError: missing or corrupt file, or a structure/shape mismatch with ``target``.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        if not isinstance(payload, dict):
            raise TypeError(f"it holds a {type(payload).__name__}, not a dict")
        meta = json.loads(payload["meta"])
        state = payload["tree"]
    except Exception as e:  # msgpack raises many types on garbage
        raise CheckpointError(f"checkpoint {path} is corrupt or not a qevo checkpoint ({type(e).__name__}: {e}); "
                              "delete it to start over") from e
    if target is None:
        return state, meta
    return restore(state, target, path), meta


def restore(state: dict, target: T, path: str | os.PathLike) -> T:
    """The pytree of ``target``'s structure holding ``state`` (a raw tree from :func:`load`
    without a target, read from ``path``, which the error names).

    Raises:
      CheckpointError: ``state`` does not have ``target``'s structure and shapes.
    """
    try:
        # flax returns a tree of target's type; its return annotation does not say so
        tree: T = serialization.from_state_dict(target, state)  # pyright: ignore[reportAssignmentType]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not match the expected structure: {e}") from e
    want = jax.tree_util.tree_map(np.shape, target)
    got = jax.tree_util.tree_map(np.shape, tree)
    if want != got:
        raise CheckpointError(f"checkpoint {path} holds arrays of other shapes than this model/config expects")
    return tree
