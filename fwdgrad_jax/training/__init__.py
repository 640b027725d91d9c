"""The training app: config schema, pure step builders, the run, run directories, the lr search,
the benchmark, plots and run records. Needs the ``[train]`` extra (flax, hydra, tfds, orbax, ...).

Layers: :mod:`.config` (the schema every run is validated against) -> :mod:`.steps` (pure jitted
builders) -> :mod:`.run` (init / restore / loop with hooks / summary, in a :mod:`.rundir`);
:mod:`.benchmark` times the steps; :mod:`.records` holds provenance, timing and JSON records;
:mod:`.plot` draws runs; :mod:`.lr_search` is the one shared learning-rate search.
Import the submodules explicitly (``from fwdgrad_jax.training import run``).
"""
