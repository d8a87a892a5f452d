"""CUDA kernels of BatchNorm, LCN, the spatial transformer, Embedding and OneHot
against their CPU kernels (simulator, tiny odd shapes), and their determinism."""
import numpy as np
import pytest

import rabbitkit
from rabbitkit.backend import get_backend
from rabbitkit.layers.batchnorm import BatchNorm
from rabbitkit.testing import check_cuda_parity


def _batchnorm(channels, relu=False):
    def make():
        layer = BatchNorm(channels, momentum=0.3)
        rng = np.random.default_rng(7)
        layer.params["weight"][:] = rng.uniform(0.5, 2, channels)
        layer.params["bias"][:] = rng.standard_normal(channels)
        layer.buffers["running_mean"][:] = rng.standard_normal(channels)
        layer.buffers["running_var"][:] = rng.uniform(0.5, 2, channels)
        layer.fused_relu = relu
        return layer
    return make


@pytest.mark.parametrize("shape", [(5, 3), (1, 2, 3, 5), (3, 4, 7)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_cuda_matches_cpu(shape, training):
    make = _batchnorm(shape[1], relu=len(shape) == 4)
    check_cuda_parity(make, shape, training=training)
    # running statistics after the step agree as well
    cpu, gpu = make(), make().to("cuda")
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    cpu.forward(x, training=training)
    gpu.forward(x, training=training)
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(gpu.buffers[name].copy_to_host(), cpu.buffers[name], rtol=1e-5, atol=1e-6)
