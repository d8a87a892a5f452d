"""Reading pretrained weights (safetensors, PyTorch .pt/.pth, Caffe .caffemodel) as numpy arrays.

    >>> from rabbitkit.weights import read_weights
    >>> weights = read_weights("vgg16.pth")          # doctest: +SKIP
    >>> weights.format, weights.tensors["features.0.weight"].shape   # doctest: +SKIP
    ('torch-zip', (64, 3, 3, 3))

No file can run code: PyTorch pickles go through rabbitkit's own opcode
interpreter with an allow-list of local stand-ins (``pickle_vm``,
``torch_globals``); see docs/weights.md for the formats and the safety model.
Every problem with a file is a :class:`~rabbitkit.errors.WeightsError` whose
message is one line naming the file.
"""
import dataclasses
import os

from ..errors import WeightsError
from .caffe import read_caffe
from .detect import CAFFE, SAFETENSORS, TORCH_LEGACY, TORCH_ZIP, detect_format
from .safetensors_reader import read_safetensors
from .torch_legacy import read_torch_legacy
from .torch_zip import read_torch_zip

__all__ = ["read_weights", "WeightFile", "WeightsError", "FORMATS"]

FORMATS = (SAFETENSORS, TORCH_ZIP, TORCH_LEGACY, CAFFE)

_READERS = {
    SAFETENSORS: read_safetensors,
    TORCH_ZIP: read_torch_zip,
    TORCH_LEGACY: read_torch_legacy,
    CAFFE: read_caffe,
}


@dataclasses.dataclass
class WeightFile:
    """The tensors of one weight file.

    ``format``: one of ``FORMATS``; ``tensors``: name -> C-contiguous, writeable
    numpy array (float32, float64 or int64), in the file's order; ``metadata``: a
    dict of plain values that depends on the format (``layers`` for Caffe,
    ``byteorder`` and any unwrapping done for PyTorch, ``safetensors_metadata``);
    ``path``: the file read.
    """

    format: str
    tensors: dict
    metadata: dict
    path: str

    def __repr__(self):
        return f"WeightFile({self.format!r}, {len(self.tensors)} tensors, path={self.path!r})"


def read_weights(path):
    """Read the weight file at ``path``; the format is detected from its content.

    Raises :class:`WeightsError` (one line, naming the file) for a missing,
    truncated, corrupt, unsupported or hostile file.
    """
    path = os.fspath(path)
    try:
        handle = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise WeightsError(f"{path}: weight file not found") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a folder, not a weight file") from None
    except OSError as err:
        raise WeightsError(f"{path}: cannot open ({err.strerror})") from None
    with handle:
        try:
            file_size = os.fstat(handle.fileno()).st_size
            head = handle.read(512)
            kind = detect_format(path, head, file_size)
            handle.seek(0)
            fmt, tensors, metadata = _READERS[kind](path, handle, file_size)
        except WeightsError:
            raise
        except MemoryError:
            raise WeightsError(f"{path}: not enough memory to hold its tensors") from None
        except OSError as err:
            raise WeightsError(f"{path}: read failed ({err.strerror or err})") from None
    return WeightFile(fmt, tensors, metadata, path)
