"""Deprecated: moved to :mod:`fwdgrad_jax.training.plot`."""

from fwdgrad_jax._moved import moved

__getattr__ = moved(__name__, "fwdgrad_jax.training.plot")

if __name__ == "__main__":
  import sys

  from fwdgrad_jax.training.plot import main

  sys.exit(main())
