"""From the object a PyTorch file pickles to a flat, ordered name -> tensor mapping.

``torch.save`` is used for bare state_dicts (``{name: tensor}``) and for training
checkpoints that wrap one (``{"epoch": 3, "state_dict": {...}, "optimizer": {...}}``),
often saved from a ``DataParallel`` model whose names all start with ``module.``.
The rules, in order:

1. while the object is a dict with a ``state_dict``, ``model_state_dict`` or
   ``model`` entry that is itself a dict, descend into it (the other entries'
   plain values - numbers, strings - are kept as metadata; their tensors, e.g. an
   optimizer's state, are not weights and are dropped);
2. flatten nested dicts and lists with ``.`` (``{"a": {"b": t}}`` -> ``a.b``,
   lists by index), keeping the file's order;
3. if every name starts with ``module.``, remove that prefix.

The walk is recursive with an explicit depth cap, so a cyclic or absurdly deep
structure built by a hostile pickle ends with a one-line error.
"""
from ..errors import WeightsError
from . import limits
from .tensors import TensorRef

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PLAIN = (str, int, float, bool, type(None))


def flatten_checkpoint(obj, where):
    """Return (names -> TensorRef, metadata dict) for the pickled object ``obj``."""
    metadata = {}
    unwrapped = []
    while isinstance(obj, dict):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None or len(unwrapped) >= limits.MAX_DEPTH:
            break
        extra = {str(k): v for k, v in obj.items() if k != key and type(v) in _PLAIN}
        if extra:
            metadata.setdefault("checkpoint", {}).update(extra)
        unwrapped.append(key)
        obj = obj[key]
    if unwrapped:
        metadata["unwrapped"] = "/".join(unwrapped)
    attributes = getattr(obj, "attributes", None)
    if attributes and isinstance(attributes.get("_metadata"), dict):
        # The per-module versions PyTorch keeps in state_dict._metadata (BatchNorm's
        # version tells whether num_batches_tracked exists); plain values only.
        metadata["state_dict_metadata"] = {
            str(k): {str(a): b for a, b in v.items() if type(b) in _PLAIN}
            for k, v in attributes["_metadata"].items() if isinstance(v, dict)}

    tensors = {}
    skipped = []
    _walk(obj, "", tensors, skipped, 0, where)
    if isinstance(obj, TensorRef):
        tensors = {"tensor": tensors[""]}
    if not tensors:
        raise WeightsError(f"{where}: no tensors found (expected a state_dict or a checkpoint holding one)")
    if all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module."):]: ref for name, ref in tensors.items()}
        metadata["stripped_prefix"] = "module."
    if skipped:
        metadata["non_tensor_entries"] = skipped[:100]
    return tensors, metadata


def _walk(obj, prefix, out, skipped, depth, where):
    if depth > limits.MAX_DEPTH:
        raise WeightsError(f"{where}: checkpoint nested deeper than {limits.MAX_DEPTH} levels (or cyclic)")
    if isinstance(obj, TensorRef):
        if prefix in out:
            raise WeightsError(f"{where}: two tensors are both named '{prefix}'")
        out[prefix] = obj
        return
    if isinstance(obj, dict):
        items = ((str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        if prefix and len(skipped) < 100:
            skipped.append(prefix)
        return
    for key, value in items:
        _walk(value, f"{prefix}.{key}" if prefix else key, out, skipped, depth + 1, where)
