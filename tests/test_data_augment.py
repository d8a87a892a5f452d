"""Augmentation: exact flips/rotations/crops, the warp kernel against scipy's bilinear
sampling, elastic fields per Simard et al., colour jitter, labels, seeding, config errors."""
import numpy as np
import pytest
from scipy.ndimage import convolve1d, map_coordinates

from rabbitkit.data.augment import Augmenter
from rabbitkit.data.filters import gaussian_weights
from rabbitkit.errors import ConfigError


@pytest.fixture
def batch(rng):
    return rng.random((64, 3, 6, 6), dtype=np.float32), rng.integers(0, 5, 64)


def test_no_options_is_identity(batch, rng):
    x, y = batch
    a = Augmenter.from_config({})
    assert not a.enabled
    out, labels = a(x, y, rng)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(labels, y)


def test_hflip_is_exact_and_affects_about_half(batch):
    x, y = batch
    original = x.copy()
    out, labels = Augmenter(hflip=True)(x, y, np.random.default_rng(0))
    np.testing.assert_array_equal(x, original)  # the input is never modified
    flipped = np.array([np.array_equal(o, i[:, :, ::-1]) for o, i in zip(out, x)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    assert (flipped | kept).all() and 16 < flipped.sum() < 48
    np.testing.assert_array_equal(labels, y)


def test_vflip_is_exact(batch):
    x, y = batch
    out, _ = Augmenter(vflip=True)(x, y, np.random.default_rng(1))
    flipped = np.array([np.array_equal(o, i[:, ::-1, :]) for o, i in zip(out, x)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    assert (flipped | kept).all() and flipped.any() and kept.any()


def test_flip_class_map_named_dataset_takes_the_datasets_own(batch):
    from rabbitkit.data.base import Dataset, Split
    from rabbitkit.train.feeders import dataset_class_maps

    split = Split(np.zeros((2, 1, 4, 4), np.uint8), np.zeros(2, np.int64))
    dataset = Dataset("signs", "classification", (1, 4, 4), 3, None, {"train": split},
                      mirror_classes={"hflip": {0: 0, 1: 2, 2: 1}})
    augment = {"hflip": True, "flip_class_map": "dataset", "translate": 2}
    resolved = dataset_class_maps(augment, dataset)
    assert resolved == {"hflip": True, "flip_class_map": {0: 0, 1: 2, 2: 1}, "translate": 2}
    assert augment["flip_class_map"] == "dataset"  # the experiment's table is left as written
    with pytest.raises(ConfigError, match="dataset 'signs' declares no class map for vflip \\(it has: hflip\\)"):
        dataset_class_maps({"vflip": True, "vflip_class_map": "dataset"}, dataset)
    with pytest.raises(ConfigError, match="flip_class_map: expected a table of class ids or \"dataset\", got 'gtsrb'"):
        dataset_class_maps({"flip_class_map": "gtsrb"}, dataset)


def test_flip_class_map(batch):
    x, _ = batch
    y = np.arange(64) % 5  # classes 0..4
    # 0 symmetric, 1 <-> 2 mirrored pair, 3 never (-1), 4 absent: never; TOML gives string keys
    table = {"0": 0, "1": 2, "2": 1, "3": -1}
    out, labels = Augmenter.from_config({"hflip": True, "flip_class_map": table})(x, y, np.random.default_rng(2))
    flipped = np.array([np.array_equal(o, i[:, :, ::-1]) for o, i in zip(out, x)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    assert (flipped | kept).all()
    assert not flipped[y >= 3].any()
    assert flipped[y == 0].any() and flipped[y == 1].any() and flipped[y == 2].any()
    expected = np.where(flipped & (y == 1), 2, np.where(flipped & (y == 2), 1, y))
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == y.dtype


def test_rot90_is_exact(batch):
    x, y = batch
    out, _ = Augmenter(rot90=True)(x, y, np.random.default_rng(3))
    ks = [[k for k in range(4) if np.array_equal(o, np.rot90(i, k, axes=(1, 2)))] for o, i in zip(out, x)]
    assert all(len(k) == 1 for k in ks)
    assert {k[0] for k in ks} == {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="square"):
        Augmenter(rot90=True)(np.zeros((1, 1, 4, 5), np.float32), np.zeros(1, np.int64), np.random.default_rng())


def shifted(img, dy, dx):
    """img moved by (dy, dx) pixels with zeros coming in (pad-and-crop)."""
    out = np.zeros_like(img)
    h, w = img.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def test_crop_padding_is_an_integer_shift(batch):
    x, y = batch
    out, _ = Augmenter(crop_padding=2, border="zero")(x, y, np.random.default_rng(4))
    seen = set()
    for o, i in zip(out, x):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if np.array_equal(o, shifted(i, dy, dx))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 10


@pytest.mark.parametrize("border, mode", [("edge", "nearest"), ("zero", "grid-constant"), ("reflect", "mirror")])
def test_warp_matches_scipy_bilinear(rng, border, mode):
    x = rng.random((6, 2, 7, 9), dtype=np.float32)
    y = np.zeros(6, np.int64)
    a = Augmenter(rotate=25.0, scale=0.2, translate=1.5, border=border)
    out, _ = a(x, y, np.random.default_rng(5))
    mats, _ = a.matrices(y, (7, 9), np.random.default_rng(5))  # the same draws
    ii, jj = np.mgrid[0:7, 0:9].astype(np.float64)
    u, v = jj - 4.0, ii - 3.0
    for s in range(6):
        sx = mats[s, 0, 0] * u + mats[s, 0, 1] * v + mats[s, 0, 2]
        sy = mats[s, 1, 0] * u + mats[s, 1, 1] * v + mats[s, 1, 2]
        for c in range(2):
            expected = map_coordinates(x[s, c].astype(np.float64), [sy, sx], order=1, mode=mode, cval=0.0)
            np.testing.assert_allclose(out[s, c], expected, atol=1e-4)


def test_affine_parameters_stay_in_range(rng):
    a = Augmenter(rotate=10.0, scale=0.1, translate=2.0)
    mats, _ = a.matrices(np.zeros(500, np.int64), (32, 32), rng)
    linear = mats[:, :, :2].astype(np.float64)
    # inverse of (rotation by theta) * s: determinant 1/s^2, angle -theta
    s = 1 / np.sqrt(np.linalg.det(linear))
    theta = -np.degrees(np.arctan2(linear[:, 1, 0], linear[:, 0, 0]))
    assert 0.9 - 1e-6 <= s.min() and s.max() <= 1.1 + 1e-6 and s.std() > 0.03
    assert np.abs(theta).max() <= 10 + 1e-4 and theta.std() > 3
    # the centre of the output samples the centre moved back by the translation, within +-2 pixels
    centre_source = mats[:, :, 2] - 15.5
    shift = -np.einsum("nij,nj->ni", np.linalg.inv(linear), centre_source)
    assert np.abs(shift).max() <= 2 + 1e-4 and shift.std() > 0.5


def test_elastic_follows_simard(rng):
    x = rng.random((3, 2, 10, 12), dtype=np.float32)
    y = np.zeros(3, np.int64)
    alpha, sigma = 3.0, 2.0
    out, _ = Augmenter(elastic_alpha=alpha, elastic_sigma=sigma, border="edge")(x, y, np.random.default_rng(6))
    # the same uniform(-1, 1) fields, smoothed by a normalised Gaussian and scaled by alpha
    noise = (np.random.default_rng(6).random((6, 10, 12), dtype=np.float32) * 2 - 1).astype(np.float64)
    w = gaussian_weights(sigma)
    ones = np.ones_like(noise)
    for axis in (-1, -2):
        noise = convolve1d(noise, w, axis=axis, mode="constant")
        ones = convolve1d(ones, w, axis=axis, mode="constant")
    disp = (alpha * noise / ones).reshape(3, 2, 10, 12)
    ii, jj = np.mgrid[0:10, 0:12].astype(np.float64)
    for s in range(3):
        for c in range(2):
            expected = map_coordinates(x[s, c].astype(np.float64), [ii + disp[s, 1], jj + disp[s, 0]], order=1, mode="nearest")
            np.testing.assert_allclose(out[s, c], expected, atol=1e-4)


def test_colour_jitter(batch):
    x, y = batch
    out, _ = Augmenter(brightness=0.2)(x, y, np.random.default_rng(7))
    offsets = (out - x).reshape(len(x), -1)
    np.testing.assert_allclose(offsets, offsets[:, :1].repeat(offsets.shape[1], 1), atol=1e-6)
    assert np.abs(offsets).max() <= 0.2 + 1e-6 and offsets[:, 0].std() > 0.05
    out, _ = Augmenter(contrast=0.5)(x, y, np.random.default_rng(8))
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1e-5)
    ratio = (out - x.mean(axis=(1, 2, 3), keepdims=True)) / (x - x.mean(axis=(1, 2, 3), keepdims=True))
    factors = np.median(ratio.reshape(len(x), -1), axis=1)
    assert factors.min() >= 0.5 - 1e-4 and factors.max() <= 1.5 + 1e-4
    out, _ = Augmenter(saturation=0.5)(x, y, np.random.default_rng(9))
    luma = lambda a: 0.299 * a[:, 0] + 0.587 * a[:, 1] + 0.114 * a[:, 2]  # noqa: E731
    np.testing.assert_allclose(luma(out), luma(x), atol=1e-5)
    assert not np.allclose(out, x)


def test_same_seed_same_batch(batch):
    x, y = batch
    a = Augmenter(hflip=True, rotate=8.0, scale=0.1, translate=2.0, elastic_alpha=2.0, brightness=0.1, contrast=0.1)
    first = a(x, y, np.random.default_rng(11))
    again = a(x, y, np.random.default_rng(11))
    other = a(x, y, np.random.default_rng(12))
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])
    assert first[0].dtype == np.float32 and first[0].shape == x.shape


def test_config_errors():
    with pytest.raises(ConfigError, match=r"augment: unknown option 'rotation' \(did you mean 'rotate'\?\)"):
        Augmenter.from_config({"rotation": 5})
    with pytest.raises(ConfigError, match="option 'hflip' must be bool"):
        Augmenter.from_config({"hflip": 1})
    with pytest.raises(ConfigError, match="scale must be < 1"):
        Augmenter.from_config({"scale": 1.5})
    with pytest.raises(ConfigError, match="border must be one of"):
        Augmenter.from_config({"border": "wrap"})
    with pytest.raises(ConfigError, match="flip_class_map must map class ids"):
        Augmenter.from_config({"hflip": True, "flip_class_map": {"stop": 3}})
    with pytest.raises(ConfigError, match="translate must be >= 0"):
        Augmenter.from_config({"translate": -1})
