"""Checkpoints in safetensors (never pickle), written atomically.

A checkpoint holds tensors under prefixes (``model/``, ``optim/``, ``preprocess/``)
and a JSON metadata record (epoch, step, config hash, schedule state, history).
It is written to a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a run killed at any moment leaves the last good
checkpoint intact.
"""
import json
import os
import pathlib

import numpy as np

from ..errors import CheckpointError

FORMAT = "rabbitkit-checkpoint-1"


def save(path, groups, metadata):
    """Write ``{prefix: {name: array}}`` and a metadata dict to ``path`` atomically."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, arrays in groups.items():
        for name, array in arrays.items():
            tensors[f"{prefix}/{name}"] = np.ascontiguousarray(array)
    record = dict(metadata, format=FORMAT)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"rabbitkit": json.dumps(record)})
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load(path):
    """Read a checkpoint: ``({prefix: {name: array}}, metadata)``; one-line errors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            raw_meta = (handle.metadata() or {}).get("rabbitkit")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if raw_meta is None:
        raise CheckpointError(f"{path}: safetensors file without rabbitkit metadata (not a rabbitkit checkpoint)")
    try:
        metadata = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: checkpoint metadata is corrupt") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {metadata.get('format')!r}, expected {FORMAT!r}")
    groups = {}
    for key, array in tensors.items():
        prefix, _, name = key.partition("/")
        groups.setdefault(prefix, {})[name] = array
    return groups, metadata
