"""Seeded, stratified train/validation splits, by sample or by group (GTSRB track)."""
import numpy as np

from ..errors import ConfigError


def _quotas(sizes, fraction, rng):
    """Per-stratum counts that sum to round(fraction * total) (largest remainder first)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(round(fraction * sizes.sum()))
    if fraction > 0 and total == 0 and sizes.sum() >= 2:
        total = 1
    exact = fraction * sizes
    quotas = np.floor(exact).astype(np.int64)
    remainder = exact - quotas
    # Ties broken at random (seeded), so no class is always favoured.
    order = np.lexsort((rng.random(len(sizes)), -remainder))
    for i in order[: max(0, total - int(quotas.sum()))]:
        if quotas[i] < sizes[i]:
            quotas[i] += 1
    # A stratum never gives away everything it has unless the whole split is validation.
    if fraction < 1:
        quotas = np.minimum(quotas, np.maximum(sizes - 1, 0))
    return quotas


def validation_mask(y, fraction, rng, groups=None):
    """Boolean mask of validation samples: about ``fraction`` of them, stratified by class.

    With ``groups``, whole groups go to validation together (every group must
    belong to one class), so near-duplicates never straddle the split.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {fraction}")
    n = len(y)
    mask = np.zeros(n, dtype=bool)
    if fraction == 0 or n == 0:
        return mask
    if groups is None:
        groups = np.arange(n)
    unique_groups, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_class = np.asarray(y)[first]
    classes = np.unique(group_class)
    members = [np.flatnonzero(group_class == c) for c in classes]
    quotas = _quotas([len(m) for m in members], fraction, rng)
    chosen = [rng.permutation(m)[:q] for m, q in zip(members, quotas)]
    chosen = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    is_val_group = np.zeros(len(unique_groups), dtype=bool)
    is_val_group[chosen] = True
    return is_val_group[inverse]


def split_validation(split, fraction, rng, by_group=True):
    """(train, val) splits of ``split``; ``by_group`` uses ``split.groups`` when present."""
    mask = validation_mask(split.y, fraction, rng, split.groups if by_group else None)
    return split.subset(~mask), split.subset(mask)


def limit_per_class(y, limit, rng, groups=None):
    """Sorted indices keeping at most ``limit`` samples per class (for quick runs).

    With ``groups`` the kept samples are whole groups in seeded random order (the
    last one cut short), so a by-group validation split still makes sense.
    """
    y = np.asarray(y)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if groups is None:
            keep.append(rng.permutation(idx)[:limit])
            continue
        g = np.asarray(groups)[idx]
        taken = 0
        for group in rng.permutation(np.unique(g)):
            if taken >= limit:
                break
            part = idx[g == group][: limit - taken]
            keep.append(part)
            taken += len(part)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
