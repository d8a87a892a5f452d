"""read_weights against files torch.save writes (skipped where torch is not installed)."""
from collections import OrderedDict

import pytest

from rabbitkit.weights import read_weights

torch = pytest.importorskip("torch")


def widened(tensor):
    t = tensor.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.is_floating_point():
        t = t.long()
    return t.contiguous().numpy()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_saved_state_dicts_read_bit_for_bit(legacy, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    base = torch.randn(5, 6)
    state = net.state_dict()
    extra = OrderedDict([("bf16", torch.randn(3, 2).bfloat16()), ("f16_t", torch.randn(2, 3).half().t()),
                         ("slice", base[1:, ::2]), ("shared", base), ("param", torch.nn.Parameter(torch.randn(2)))])
    for obj in (state, extra):
        path = tmp_path / f"m{len(obj)}.pth"
        torch.save({"epoch": 2, "state_dict": obj}, path, _use_new_zipfile_serialization=not legacy)
        weights = read_weights(path)
        assert weights.format == ("torch-legacy" if legacy else "torch-zip")
        assert list(weights.tensors) == list(obj)
        for name, tensor in obj.items():
            want = widened(tensor)
            got = weights.tensors[name]
            assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes(), name
    assert weights.metadata["checkpoint"] == {"epoch": 2}
