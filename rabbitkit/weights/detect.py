"""Which format a file is in, from its first bytes (never from its name).

Extensions lie: ``.pth`` is used for both PyTorch formats, ``.bin`` for PyTorch
and safetensors, and a renamed or mis-downloaded file (an HTML error page, an
image) must get a message saying what it really is, not a parser error deep in
the wrong reader.
"""
from ..errors import WeightsError

SAFETENSORS, TORCH_ZIP, TORCH_LEGACY, CAFFE = "safetensors", "torch-zip", "torch-legacy", "caffe"

# Other formats people mistake for weight files, for the error message.
_OTHER = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"BZh", "a bzip2 archive (unpack it first)"),
    (b"\xfd7zXZ\x00", "an xz archive (unpack it first)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (unpack it first)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5 weights are not supported)"),
    (b"\x93NUMPY", "a numpy .npy array"),
    (b"GGUF", "a GGUF model"),
    (b"%PDF", "a PDF document"),
    (b"<!DOCTYPE", "an HTML page (a failed download?)"),
    (b"<html", "an HTML page (a failed download?)"),
]

# NetParameter's fields with their wire types; a caffemodel starts with one of them.
_CAFFE_FIRST_TAGS = {(1, 2), (2, 2), (3, 2), (4, 0), (4, 2), (5, 0), (6, 2), (7, 0), (8, 2), (100, 2)}

_EXPECTED = "expected safetensors, a PyTorch .pt/.pth (zip or legacy) or a Caffe .caffemodel"


def detect_format(path, head, file_size):
    """The format name for a file whose first bytes are ``head`` (at least 512 if the file has them)."""
    where = str(path)
    if file_size == 0:
        raise WeightsError(f"{where}: empty file ({_EXPECTED})")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return TORCH_ZIP
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return TORCH_LEGACY
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS
    for magic, what in _OTHER:
        if head.startswith(magic):
            raise WeightsError(f"{where}: this is {what}, not a weight file ({_EXPECTED})")
    if len(head) >= 263 and head[257:262] == b"ustar":
        raise WeightsError(f"{where}: a tar archive (PyTorch < 0.4 saved tar files; they are not supported; "
                           "unpack other archives first)")
    if head[:1] in (b"\x80",):
        raise WeightsError(f"{where}: a pickle of protocol {head[1] if len(head) > 1 else '?'}, "
                           "not one torch.save writes (2-5)")
    if head[:1] in (b"{", b"[") or _is_text(head):  # before caffe: a prototxt may start with a newline
        raise WeightsError(f"{where}: a text file, not a weight file (a .prototxt or JSON? {_EXPECTED})")
    if _looks_like_caffe(head):
        return CAFFE
    raise WeightsError(f"{where}: unrecognized content (first bytes {head[:8].hex(' ')}; {_EXPECTED})")


def _looks_like_caffe(head):
    tag = shift = 0
    for i, byte in enumerate(head[:3]):
        tag |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (tag >> 3, tag & 7) in _CAFFE_FIRST_TAGS
    return False


def _is_text(head):
    for cut in range(4):  # the head may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return bool(text) and all(c.isprintable() or c in "\r\n\t" for c in text)
    return False

