"""Seeing what a network learned: Deep Dream, class models, saliency (and the
shared image-optimisation utilities in :mod:`rabbitkit.visualize.common`).

Not to be confused with :mod:`rabbitkit.viz`, whose every module is a built-in
plugin loaded at start-up; this package is imported only when used.
"""
