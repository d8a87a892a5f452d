"""CUDA kernels of BatchNorm, LCN, the spatial transformer, Embedding and OneHot
against their CPU kernels (simulator, tiny odd shapes), and their determinism."""
import numpy as np
import pytest

import rabbitkit
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


# -- Embedding / OneHot ------------------------------------------------------------
def test_embedding_and_one_hot_cuda_match_cpu():
    from rabbitkit.layers.embedding import Embedding, OneHot

    # repeated indices: the weight gradient adds several rows into one
    tokens = np.array([[3, 0, 3], [1, 3, 4]])
    results = check_cuda_parity(lambda: Embedding(6, 5), tokens.shape, inputs=tokens)
    np.testing.assert_array_equal(results["cuda"]["grad weight"], results["cpu"]["grad weight"])  # the CPU's order
    check_cuda_parity(lambda: OneHot(5), (1, 3), inputs=np.array([[4, 0, 4]]))


# -- spatial transformer -----------------------------------------------------------
def _transformer(out_size=None, identity=False):
    """A transformer whose localization (Flatten -> Dense) starts off the identity, so
    the sampler reads between pixels and past the border; or, with ``identity``, at
    the identity as the default localization does (every point on a pixel centre,
    where the sampler's derivative jumps)."""
    from rabbitkit.layers.dense import Dense
    from rabbitkit.layers.flatten import Flatten
    from rabbitkit.layers.spatial_transformer import IDENTITY_THETA, SpatialTransformer

    def make():
        dense = Dense(2 * 4 * 5, 6)
        dense.params["weight"][...] *= 0.0 if identity else 0.3
        dense.params["bias"][...] = IDENTITY_THETA if identity else (0.9, 0.2, 0.1, -0.15, 1.1, -0.05)
        return SpatialTransformer(rabbitkit.Sequential([Flatten(), dense]), output_size=out_size)
    return make


@pytest.mark.parametrize("out_size, identity", [(None, False), ((3, 6), False), (None, True)])
def test_spatial_transformer_cuda_matches_cpu(out_size, identity):
    results = check_cuda_parity(_transformer(out_size, identity), (2, 2, 4, 5))
    if identity:
        np.testing.assert_array_equal(results["cuda"]["output"], results["cpu"]["output"])


# -- LCN ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, size", [((2, 3, 5, 7), 3), ((1, 2, 4, 3), 5)])
def test_lcn_cuda_matches_cpu(shape, size):
    from rabbitkit.layers.lcn import LocalContrastNorm

    check_cuda_parity(lambda: LocalContrastNorm(shape[1], kernel_size=size), shape)


# -- determinism ------------------------------------------------------------------------
def _lcn():
    from rabbitkit.layers.lcn import LocalContrastNorm

    return LocalContrastNorm(2, kernel_size=3)


@pytest.mark.parametrize("make, shape", [(_batchnorm(3, relu=True), (2, 3, 3, 4)), (_transformer(), (2, 2, 4, 5)),
                                         (_lcn, (2, 2, 4, 3))], ids=["batchnorm", "transformer", "lcn"])
def test_cuda_kernels_give_the_same_bits_twice(make, shape):
    runs = []
    for _ in range(2):
        rabbitkit.random.manual_seed(11)  # the same initial weights
        runs.append(check_cuda_parity(make, shape)["cuda"])
    first, second = runs
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
