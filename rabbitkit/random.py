"""Seeding: one call makes parameter initialisation and layer randomness reproducible."""
import numpy as np

_root = np.random.SeedSequence()


def manual_seed(seed):
    """Seed everything rabbitkit draws afterwards (initialisation, dropout, shuffling)."""
    global _root
    _root = np.random.SeedSequence(int(seed))


def layer_rng():
    """A new generator from the root sequence (each layer gets its own stream)."""
    return np.random.default_rng(_root.spawn(1)[0])
