"""Deprecated: moved to :mod:`fwdgrad_jax.training.benchmark`."""

from fwdgrad_jax._moved import moved

__getattr__ = moved(__name__, "fwdgrad_jax.training.benchmark")
