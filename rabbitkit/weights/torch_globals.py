"""The allow-list: the globals a PyTorch weight file may name, and their local stand-ins.

A state_dict pickle names only a handful of globals: ``collections.OrderedDict``
(the dict type of a state_dict and of a tensor's empty backward-hook table),
``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` / ``_rebuild_parameter``
(how a tensor or Parameter reduces), the storage types (``torch.FloatStorage`` ...)
that name a storage's element type in its persistent id, and the ``torch.float32``
style dtypes. Each maps to a stand-in defined here that checks its arguments and
builds plain data (``TensorRef``, ``PickledOrderedDict``); nothing here imports or
calls anything the file names, and torch itself is never imported.

Deliberately absent (refused with the global's name): ``torch._tensor._rebuild_from_type_v2``
(tensor subclasses and tensors with Python attributes), quantized, sparse, nested,
meta and wrapper-subclass tensors, ``torch.Size``, ``torch.device``,
``numpy`` scalars and arrays, ``argparse.Namespace`` and every other class:
each would either need real objects or has no meaning as a weight.
"""
from .pickle_vm import Global, PickledOrderedDict
from .tensors import ELEMENT_TYPES, StorageRef, TensorRef, check_shape

# Storage class name -> element type. Complex and quantized storages are left out.
STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}

# torch dtype names (and their aliases) -> element type.
DTYPES = {
    "float64": "float64", "double": "float64", "float32": "float32", "float": "float32",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16", "int64": "int64", "long": "int64",
    "int32": "int32", "int": "int32", "int16": "int16", "short": "int16", "int8": "int8", "uint8": "uint8",
    "bool": "bool", "uint16": "uint16", "uint32": "uint32",
}


def _ordered_dict(args, vm):
    result = PickledOrderedDict()
    if args == ():
        return result
    if len(args) == 1 and type(args[0]) in (list, tuple):
        pairs = args[0]
        if all(type(p) is tuple and len(p) == 2 for p in pairs):
            vm.set_items(result, [x for p in pairs for x in p])
            return result
    vm.fail("collections.OrderedDict takes no arguments or one list of (key, value) pairs here")


def _empty_hooks(value):
    # A tensor's backward hooks: always empty in a saved state_dict (a non-empty
    # table would need callables, which are refused anyway).
    return isinstance(value, dict) and not value


def _tensor(vm, name, storage, offset, size, stride):
    if not isinstance(storage, StorageRef):
        vm.fail(f"{name} expects a storage as its first argument, got a {type(storage).__name__}")
    check_shape(lambda message: vm.fail(f"{name}: {message}"), size, stride, offset)
    return TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v2(args, vm):
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    if len(args) not in (6, 7):
        vm.fail(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {len(args)}")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    if type(requires_grad) is not bool or not _empty_hooks(hooks):
        vm.fail("_rebuild_tensor_v2: requires_grad must be a bool and backward_hooks empty")
    if len(args) == 7 and args[6] not in (None, {}):
        # torch writes tensor metadata only for conjugate/negative views of complex tensors.
        vm.fail("_rebuild_tensor_v2 with tensor metadata (conjugate or negative views) is not supported")
    return _tensor(vm, "_rebuild_tensor_v2", storage, offset, size, stride)


def _rebuild_tensor(args, vm):
    # PyTorch < 1.0: (storage, storage_offset, size, stride)
    if len(args) != 4:
        vm.fail(f"_rebuild_tensor takes 4 arguments, got {len(args)}")
    return _tensor(vm, "_rebuild_tensor", *args)


def _rebuild_parameter(args, vm):
    # (data, requires_grad, backward_hooks): a Parameter's weights are its data tensor.
    if len(args) != 3 or not isinstance(args[0], TensorRef) or type(args[1]) is not bool or not _empty_hooks(args[2]):
        vm.fail("_rebuild_parameter takes (tensor, bool, empty hooks)")
    return args[0]


def _rebuild_parameter_with_state(args, vm):
    # (data, requires_grad, backward_hooks, state): the state holds Python attributes
    # of a Parameter subclass; they are not weights and are dropped unread.
    if len(args) != 4 or not isinstance(args[3], (dict, type(None))):
        vm.fail("_rebuild_parameter_with_state takes (tensor, bool, empty hooks, dict)")
    return _rebuild_parameter(args[:3], vm)


def allowed_globals():
    """{"module.name": Global} for every global a weight file may name."""
    table = {
        "collections.OrderedDict": Global("collections.OrderedDict", _ordered_dict),
        "torch._utils._rebuild_tensor_v2": Global("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
        "torch._utils._rebuild_tensor": Global("torch._utils._rebuild_tensor", _rebuild_tensor),
        "torch._utils._rebuild_parameter": Global("torch._utils._rebuild_parameter", _rebuild_parameter),
        "torch._utils._rebuild_parameter_with_state":
            Global("torch._utils._rebuild_parameter_with_state", _rebuild_parameter_with_state),
    }
    # Storage types are data only (no call): they name an element type in a persistent id.
    for cls, etype in STORAGE_TYPES.items():
        for module in ("torch", "torch.cuda"):  # files saved on a GPU by PyTorch < 1.0 name torch.cuda
            table[f"{module}.{cls}"] = Global(f"{module}.{cls}", value=ELEMENT_TYPES[etype])
    # An untyped storage is bytes (torch >= 2 when a storage itself is saved).
    for name in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
        table[name] = Global(name, value=ELEMENT_TYPES["uint8"])
    for alias, etype in DTYPES.items():
        table[f"torch.{alias}"] = Global(f"torch.{alias}", value=ELEMENT_TYPES[etype])
    return table


class Storages:
    """The BINPERSID handler: turns storage ids into ``StorageRef``s, one per key.

    A persistent id is ``('storage', storage_type, key, location, numel)`` in the
    zip format and the same plus ``view_metadata`` (always None since PyTorch 0.4)
    in the legacy format. The declared ``numel`` is checked later against the bytes
    the file really holds.
    """

    def __init__(self, legacy):
        self.legacy = legacy
        self.by_key = {}

    def __call__(self, pid, vm):
        size = 6 if self.legacy else 5
        if type(pid) is not tuple or len(pid) != size or pid[0] != "storage":
            vm.fail(f"persistent id is not a ('storage', type, key, location, numel{', view' if self.legacy else ''}) tuple")
        _, storage_type, key, location, numel = pid[:5]
        if self.legacy and pid[5] is not None:
            vm.fail("storage views of PyTorch < 0.4 are not supported")
        if not isinstance(storage_type, Global) or storage_type.value is None:
            what = storage_type.name if isinstance(storage_type, Global) else type(storage_type).__name__
            vm.fail(f"persistent id names '{what}' where a storage type belongs")
        if type(key) is not str or not key or len(key) > 64 or type(location) is not str:
            vm.fail("storage key and location must be short strings")
        if type(numel) is not int or not 0 <= numel < 2**62:
            vm.fail("storage element count must be a non-negative integer")
        etype = storage_type.value
        known = self.by_key.get(key)
        if known is None:
            known = self.by_key[key] = StorageRef(key, etype, numel, location)
        elif known.etype is not etype or known.numel != numel:
            vm.fail(f"storage '{key}' is referred to with two different types or sizes")
        return known
