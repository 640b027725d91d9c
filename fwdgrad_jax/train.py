"""Deprecated: moved to :mod:`fwdgrad_jax.training.run` and :mod:`fwdgrad_jax.training.steps`."""

from fwdgrad_jax._moved import moved

__getattr__ = moved(__name__, "fwdgrad_jax.training.run", "fwdgrad_jax.training.steps")
