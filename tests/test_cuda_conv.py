"""CUDA kernels of the backend GEMM and Conv2D against the CPU (simulator, tiny shapes)."""
import numpy as np
import pytest

from rabbitkit.backend import get_backend
from rabbitkit.layers.conv2d import Conv2D
from rabbitkit.testing import check_cuda_parity


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (7, 13, 5), (17, 9, 11), (5, 35, 20)])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_matches_numpy(m, n, k, trans_a, trans_b, rng):
    """Partial tiles in every direction, several blocks and k slices, both
    transposes, alpha and beta."""  # simulator tiles: 16 x 16, 8 deep, 4 x 4 per thread
    backend = get_backend("cuda")
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    expected = 0.5 * (a.T if trans_a else a) @ (b.T if trans_b else b) + 2.0 * c
    out = backend.asarray(c)
    backend.gemm(backend.asarray(a), backend.asarray(b), out, trans_a, trans_b, alpha=0.5, beta=2.0)
    np.testing.assert_allclose(out.copy_to_host(), expected, rtol=1e-5, atol=1e-5)


# (batch, in, height, width, out, kernel, stride, padding): 1x1, 3x3, 7x7, strides,
# padding edges, batch 1, non-square images and kernels.
CONV_CASES = [
    (1, 2, 5, 4, 3, 3, 1, 1),
    (2, 3, 7, 5, 4, (3, 2), (2, 1), (1, 0)),
    (2, 3, 4, 3, 2, 1, 1, 0),
    (1, 2, 9, 8, 2, 7, 2, 3),
    (3, 1, 6, 5, 2, 3, 3, 2),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_cuda_matches_cpu(case, bias):
    n, c, h, w, o, k, s, p = case
    check_cuda_parity(lambda: Conv2D(c, o, k, stride=s, padding=p, bias=bias), (n, c, h, w))


def test_conv2d_cuda_chunks_fused_relu_and_skipped_input_grad():
    """A column budget of one sample and a half (chunks 1, 1, 1), the fused ReLU on
    both devices, and the first-layer path without input gradient."""
    def make():
        layer = Conv2D(2, 3, 3, padding=1)
        layer.cuda_cols_budget = 2 * 9 * 20 + 30
        layer.fused_relu = True
        return layer

    results = check_cuda_parity(make, (3, 2, 4, 5))
    assert (results["cuda"]["output"] >= 0).all() and (results["cuda"]["output"] == 0).any()

    def first_layer():
        layer = make()
        layer.skip_input_grad()
        return layer

    results = check_cuda_parity(first_layer, (3, 2, 4, 5))
    assert "input grad" not in results["cuda"]


def test_sequential_fuses_relu_on_cuda_too():
    """Sequential lets Conv2D and BatchNorm apply the ReLU after them on both devices;
    the fused CUDA model matches the CPU's."""
    import rabbitkit
    from rabbitkit.layers.activations import ReLU
    from rabbitkit.layers.batchnorm import BatchNorm

    def make():
        rabbitkit.random.manual_seed(2)
        return rabbitkit.Sequential([Conv2D(2, 3, 3, padding=1), ReLU(), BatchNorm(3), ReLU()])

    model = make().to("cuda")
    model.forward(np.zeros((2, 2, 4, 3), np.float32))
    assert model[0].fused_relu and model[1].absorbed and model[2].fused_relu and model[3].absorbed
    check_cuda_parity(make, (2, 2, 4, 3))
