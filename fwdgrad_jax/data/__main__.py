"""``python -m fwdgrad_jax.data prepare NAME``: prepare a data set with tfds."""

import sys

from fwdgrad_jax.data import main

sys.exit(main())
