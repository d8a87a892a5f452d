"""Exporting a model's weights for PyTorch.

rabbitkit's parameter names are PyTorch's (``Sequential`` children by position
or by the module's attribute names) and its layouts are too: Dense weights are
(out, in) as ``nn.Linear``'s, Conv2D weights (out, in, kh, kw) as
``nn.Conv2d``'s.  :func:`torch_state_dict` therefore only reorders (each
layer's parameters, then its buffers, parents before children, as
``Module.state_dict``) and adds what PyTorch has and rabbitkit has not: every
``BatchNorm2d``'s ``num_batches_tracked`` (an int64 scalar, written as 0 since
rabbitkit does not count batches).  Layers whose PyTorch counterpart lays out
its tensors differently are refused, naming the layer.
"""
import numpy as np

from .errors import RabbitError

# rabbitkit layer -> its PyTorch module, where names and layouts are identical.
TORCH_MODULES = {"Dense": "nn.Linear", "Conv2D": "nn.Conv2d", "BatchNorm": "nn.BatchNorm2d",
                 "PReLU": "nn.PReLU", "Embedding": "nn.Embedding"}


class ExportError(RabbitError):
    """A model holds a layer whose tensors have no PyTorch layout rabbitkit knows."""


def _host(layer, array):
    return np.ascontiguousarray(layer.backend.to_host(array))


def torch_state_dict(model):
    """``{name: array}`` that the matching ``torch.nn`` module's ``load_state_dict`` accepts (strict)."""
    state = {}
    for path, layer in [("", model)] + list(model.named_layers()):
        if not layer.params and not layer.buffers:
            continue
        kind = type(layer).__name__
        if kind not in TORCH_MODULES:
            raise ExportError(f"layer '{path}' ({kind}) has no PyTorch layout rabbitkit can export "
                              f"(exportable: {', '.join(sorted(TORCH_MODULES))}); use --names rabbitkit")
        prefix = f"{path}." if path else ""
        for key, value in layer.params.items():
            state[prefix + key] = _host(layer, value)
        for key, value in layer.buffers.items():
            state[prefix + key] = _host(layer, value)
        if kind == "BatchNorm":
            state[prefix + "num_batches_tracked"] = np.zeros((), dtype=np.int64)
    return state


def save_safetensors(path, tensors, metadata=None):
    """A plain safetensors file (no rabbitkit checkpoint record): what ``safetensors.torch.load_file`` reads."""
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
