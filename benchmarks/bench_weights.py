"""Load time and peak memory of read_weights on a VGG-16-sized file (138M float32, 553 MB).

    python benchmarks/bench_weights.py [--folder DIR] [--repeats 3] [--keep]

Writes the torchvision VGG-16 state_dict shapes, filled with random float32, as a
PyTorch zip file, a legacy PyTorch file, a safetensors file and a Caffe
caffemodel (the zip and legacy files with the test writers in
tests/weights_writers.py, whose output matches torch.save's, see
check_torch_weights.py; safetensors with the safetensors package), then for each:

- ``disk``: reading the file from the disk itself, bypassing the page cache
  (``dd iflag=direct bs=16M``), so other processes' caches are left alone;
- ``cat``: reading it from the page cache (``cat FILE > /dev/null``, warm) - the
  harshest baseline: cat reuses one small buffer, while any loader that returns
  the tensors must also fault in fresh memory for all of them;
- ``fresh``: one ``readinto`` of the whole warm file into a new numpy array: that
  floor (page cache -> new memory) for comparison;
- ``load``: ``read_weights`` in a fresh subprocess from a warm page cache, best
  of ``--repeats``;
- ``peak``: that subprocess's peak resident memory (``VmHWM``; ``ru_maxrss`` would
  carry the parent's size across fork/exec), in total and above what it held
  just before the call (Python, numpy, rabbitkit).

The goal: load <= 2x the read from disk, peak <= 1.5x the file size. The
machine is shared, so times are indicative; best-of-N hides some of the noise.
"""
import argparse
import os
import pathlib
import struct
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

VGG16 = [  # torchvision.models.vgg16().state_dict() names and shapes
    ("features.0", (64, 3, 3, 3)), ("features.2", (64, 64, 3, 3)),
    ("features.5", (128, 64, 3, 3)), ("features.7", (128, 128, 3, 3)),
    ("features.10", (256, 128, 3, 3)), ("features.12", (256, 256, 3, 3)), ("features.14", (256, 256, 3, 3)),
    ("features.17", (512, 256, 3, 3)), ("features.19", (512, 512, 3, 3)), ("features.21", (512, 512, 3, 3)),
    ("features.24", (512, 512, 3, 3)), ("features.26", (512, 512, 3, 3)), ("features.28", (512, 512, 3, 3)),
    ("classifier.0", (4096, 25088)), ("classifier.3", (4096, 4096)), ("classifier.6", (1000, 4096)),
]


def vgg16_arrays():
    rng = np.random.default_rng(0)
    for layer, shape in VGG16:
        yield f"{layer}.weight", rng.standard_normal(shape, dtype=np.float32)
        yield f"{layer}.bias", rng.standard_normal(shape[0], dtype=np.float32)


def state_dict_pickle(entries, legacy):
    from weights_writers import Pickle, c_strides

    p = Pickle().ordered_dict().put().op("MARK")
    for key, (name, shape) in enumerate(entries):
        numel = int(np.prod(shape))
        p.str(name).tensor("FloatStorage", str(key), numel, 0, shape, c_strides(shape), legacy=legacy)
    return bytes(p.op("SETITEMS"))


def write_zip(path):
    entries = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, (name, array) in enumerate(vgg16_arrays()):
            entries.append((name, array.shape))
            with archive.open(f"archive/data/{key}", "w", force_zip64=True) as entry:
                entry.write(memoryview(array).cast("B"))
        archive.writestr("archive/data.pkl", state_dict_pickle(entries, legacy=False))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


def write_legacy(path):
    from weights_writers import Pickle, legacy_header

    shapes = [(name, shape) for layer, shape in VGG16 for name, shape in
              ((f"{layer}.weight", shape), (f"{layer}.bias", (shape[0],)))]
    keys = sorted(str(k) for k in range(len(shapes)))
    key_list = Pickle().op("EMPTY_LIST").op("MARK")
    for key in keys:
        key_list.str(key)
    arrays = dict((str(k), a) for k, (_, a) in enumerate(vgg16_arrays()))
    with open(path, "wb") as out:
        out.write(legacy_header() + state_dict_pickle(shapes, legacy=True) + bytes(key_list.op("APPENDS")))
        for key in keys:  # storages in the sorted key order, as torch writes them
            out.write(struct.pack("<q", arrays[key].size))
            out.write(memoryview(arrays[key]).cast("B"))


def write_safetensors(path):
    from safetensors.numpy import save_file

    save_file(dict(vgg16_arrays()), str(path))


def write_caffe(path):
    from weights_writers import field_bytes, varint

    with open(path, "wb") as out:
        out.write(field_bytes(1, b"VGG_ILSVRC_16_layers"))
        arrays = dict(vgg16_arrays())
        for layer, shape in VGG16:
            body = field_bytes(1, layer.encode()) + field_bytes(2, b"Convolution" if len(shape) == 4 else b"InnerProduct")
            blobs = []
            for array in (arrays[f"{layer}.weight"], arrays[f"{layer}.bias"]):
                dims = field_bytes(7, field_bytes(1, b"".join(varint(d) for d in array.shape)))
                head = dims + varint(5 << 3 | 2) + varint(array.nbytes)
                blobs.append((varint(7 << 3 | 2) + varint(len(head) + array.nbytes) + head, array))
            size = len(body) + sum(len(h) + a.nbytes for h, a in blobs)
            out.write(varint(100 << 3 | 2) + varint(size) + body)
            for head, array in blobs:
                out.write(head)
                out.write(memoryview(array).cast("B"))


WRITERS = {"torch-zip": write_zip, "torch-legacy": write_legacy, "safetensors": write_safetensors,
           "caffe": write_caffe}

CHILD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from rabbitkit.weights import read_weights

def high_water():  # peak resident bytes of this process image
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

before = high_water()
start = time.perf_counter()
weights = read_weights(sys.argv[1])
seconds = time.perf_counter() - start
peak = high_water()
n = sum(a.size for a in weights.tensors.values())
print(weights.format, seconds, before, peak, n)
"""

FRESH = """
import sys, time, numpy as np
size = int(sys.argv[2])
start = time.perf_counter()
array = np.empty(size, np.uint8)
with open(sys.argv[1], "rb", buffering=0) as handle:
    done = 0
    while done < size:
        done += handle.readinto(memoryview(array)[done:])
print(time.perf_counter() - start)
"""


def timed_direct(path):
    start = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def timed_fresh(path, size):
    result = subprocess.run([sys.executable, "-c", FRESH, str(path), str(size)], check=True,
                            capture_output=True, text=True)
    return float(result.stdout)


def timed_cat(path):
    start = time.perf_counter()
    with open(path, "rb") as source, open(os.devnull, "wb") as sink:
        subprocess.run(["cat"], stdin=source, stdout=sink, check=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", help="where to write the files (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    parser.add_argument("--formats", default=",".join(WRITERS))
    args = parser.parse_args()
    folder = pathlib.Path(args.folder or tempfile.mkdtemp(prefix="bench_weights_"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{'format':13s} {'size MB':>7s} {'disk s':>6s} {'cat s':>6s} {'fresh s':>7s} {'load s':>6s} "
          f"{'load/disk':>9s} {'load/cat':>8s} {'peak MB':>7s} {'peak/size':>9s} {'added/size':>10s}")
    try:
        for fmt in args.formats.split(","):
            path = folder / f"vgg16.{fmt}"
            WRITERS[fmt](path)
            size = path.stat().st_size
            disk = min(timed_direct(path) for _ in range(args.repeats))
            timed_cat(path)  # warm the page cache
            read = min(timed_cat(path) for _ in range(args.repeats))
            fresh = min(timed_fresh(path, size) for _ in range(args.repeats))
            loads, peaks, added = [], [], []
            for _ in range(args.repeats):
                result = subprocess.run([sys.executable, "-c", CHILD, str(path), str(ROOT)], check=True,
                                        capture_output=True, text=True)
                got, seconds, before, peak, n = result.stdout.split()
                assert got == fmt and int(n) == 138357544, result.stdout
                loads.append(float(seconds))
                peaks.append(int(peak))
                added.append(int(peak) - int(before))
            load, peak, extra = min(loads), max(peaks), max(added)
            print(f"{fmt:13s} {size / 1e6:7.1f} {disk:6.3f} {read:6.3f} {fresh:7.3f} {load:6.3f} "
                  f"{load / disk:9.2f} {load / read:8.2f} {peak / 1e6:7.1f} {peak / size:9.2f} {extra / size:10.2f}",
                  flush=True)
            if not args.keep:
                path.unlink()
    finally:
        if not args.keep and not args.folder:
            for leftover in folder.iterdir():
                leftover.unlink()
            folder.rmdir()


if __name__ == "__main__":
    main()
