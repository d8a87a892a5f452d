"""Cross-check rabbitkit.weights against files torch.save really writes (dev tool, needs torch).

    /work/venv-torch/bin/python benchmarks/check_torch_weights.py

Saves small state_dicts and checkpoints with torch in both formats (zip, and the
legacy stream with ``_use_new_zipfile_serialization=False``), and with pickle
protocols 2 and 4: float16/bfloat16/float64/integer/bool tensors, transposed and
sliced views, storages shared between tensors, Parameters, real module
state_dicts (an OrderedDict carrying ``_metadata``), training checkpoints wrapping
one, a DataParallel state_dict. Each is read with ``read_weights`` and compared bit
for bit with torch's own widening of the same tensors (``.float()`` for half and
bfloat16, ``.long()`` for integers and bools). Exits non-zero on any mismatch.
"""
import pathlib
import sys
import tempfile
from collections import OrderedDict

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from rabbitkit.errors import WeightsError  # noqa: E402
from rabbitkit.weights import read_weights  # noqa: E402


def expected(tensor):
    t = tensor.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif t.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.bool, torch.uint16, torch.uint32):
        t = t.long()
    return t.contiguous().numpy()


def flat_tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.classifier = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def cases():
    torch.manual_seed(0)
    net = Net()
    net.features[1].running_mean.uniform_()
    net.features[1].num_batches_tracked += 17
    base = torch.randn(6, 8)
    shared = torch.arange(20, dtype=torch.float32)
    yield "module state_dict", net.state_dict(), None
    yield "dtypes", {
        "f16": torch.randn(3, 4).half(), "bf16": torch.randn(5, 2).bfloat16(), "f64": torch.randn(3).double(),
        "i8": torch.tensor([-128, 127], dtype=torch.int8), "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "i16": torch.tensor([-3], dtype=torch.int16), "i32": torch.tensor([2**31 - 1], dtype=torch.int32),
        "i64": torch.tensor([-2**62]), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
        # no storage class: saved as _rebuild_tensor_v3 on an UntypedStorage with a dtype global
        "u16": torch.tensor([[0, 65535, 7], [1, 2, 3]], dtype=torch.uint16).t(),
        "u32": torch.tensor([2**32 - 1, 5], dtype=torch.uint32),
    }, None
    yield "views", {
        "transposed": base.t(), "sliced": base[1:, ::2], "narrow": base.narrow(1, 2, 3),
        "column": base[:, 5], "bf16_view": torch.randn(4, 6).bfloat16()[1:3, 1:], "f16_t": torch.randn(3, 5).half().t(),
    }, None
    yield "shared storages", {"a": shared, "b": shared[3:9], "c": shared, "d": shared.view(4, 5)[:, 1]}, None
    tied = torch.nn.Linear(3, 3, bias=False)
    yield "parameters", OrderedDict([("p", torch.nn.Parameter(torch.randn(2, 3))), ("tied1", tied.weight),
                                     ("tied2", tied.weight)]), None
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    yield "training checkpoint", {"epoch": 3, "best_acc": 0.75, "arch": "net", "state_dict": net.state_dict(),
                                  "optimizer": opt.state_dict()}, "state_dict"
    yield "DataParallel", torch.nn.DataParallel(net).state_dict(), "module."
    yield "bare tensor", torch.randn(2, 2), None


def main():
    failures = 0
    checked = 0
    with tempfile.TemporaryDirectory() as folder:
        for name, obj, special in cases():
            for fmt, options in [("torch-zip", {}), ("torch-zip", {"pickle_protocol": 4}),
                                 ("torch-legacy", {"_use_new_zipfile_serialization": False}),
                                 ("torch-legacy", {"_use_new_zipfile_serialization": False, "pickle_protocol": 4})]:
                path = pathlib.Path(folder) / f"{name.replace(' ', '_')}_{len(options)}_{fmt}.pth"
                torch.save(obj, path, **options)
                label = f"{name} [{fmt}, protocol {options.get('pickle_protocol', 2)}]"
                try:
                    weights = read_weights(path)
                except WeightsError as err:
                    print(f"FAIL {label}: {err}")
                    failures += 1
                    continue
                source = obj["state_dict"] if special == "state_dict" else obj
                want = flat_tensors(source)
                if special == "module.":
                    want = {k[len("module."):]: v for k, v in want.items()}
                if isinstance(obj, torch.Tensor):
                    want = {"tensor": obj}
                problems = []
                if weights.format != fmt:
                    problems.append(f"format {weights.format}")
                if list(weights.tensors) != list(want):
                    problems.append(f"names {list(weights.tensors)} != {list(want)}")
                for key, tensor in want.items():
                    got, ref = weights.tensors.get(key), expected(tensor)
                    if got is None or not got.flags.c_contiguous or got.dtype != ref.dtype or got.shape != ref.shape or got.tobytes() != ref.tobytes():
                        problems.append(f"{key}: got {None if got is None else (got.dtype, got.shape)}, "
                                        f"want {(ref.dtype, ref.shape)}")
                if special == "state_dict" and weights.metadata.get("checkpoint") != {"epoch": 3, "best_acc": 0.75,
                                                                                      "arch": "net"}:
                    problems.append(f"checkpoint metadata {weights.metadata.get('checkpoint')}")
                if isinstance(obj, OrderedDict) and hasattr(obj, "_metadata"):
                    versions = {k: dict(v) for k, v in obj._metadata.items()}
                    if weights.metadata.get("state_dict_metadata") != versions:
                        problems.append("state_dict _metadata not carried")
                checked += len(want)
                print(("FAIL " if problems else "ok   ") + f"{label}: {len(weights.tensors)} tensors"
                      + (f": {'; '.join(problems)}" if problems else ""))
                failures += bool(problems)
        # safetensors as torch's side of the package writes it, bfloat16 included.
        from safetensors.torch import save_file

        tensors = {"bf16": torch.randn(7, 3).bfloat16(), "f16": torch.randn(4).half(), "f32": torch.randn(2, 2),
                   "f64": torch.randn(3).double(), "i64": torch.tensor([5, -6]), "i8": torch.tensor([-1], dtype=torch.int8)}
        path = pathlib.Path(folder) / "model.safetensors"
        save_file(tensors, str(path))
        weights = read_weights(path)
        bad = [k for k, t in tensors.items()
               if weights.tensors[k].dtype != expected(t).dtype or weights.tensors[k].tobytes() != expected(t).tobytes()]
        checked += len(tensors)
        failures += bool(bad)
        print(("FAIL " if bad else "ok   ") + f"safetensors.torch file: {len(weights.tensors)} tensors" + (f": {bad}" if bad else ""))
        # A broadcast view is refused (documented), rather than read into unbounded memory.
        path = pathlib.Path(folder) / "expanded.pth"
        torch.save({"e": torch.randn(1, 3).expand(4, 3)}, path)
        try:
            read_weights(path)
            print("FAIL expanded view: read, expected a refusal")
            failures += 1
        except WeightsError as err:
            print(f"ok   expanded view refused: {err}")
    print(f"{checked} tensors compared, {failures} failures; torch {torch.__version__}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
