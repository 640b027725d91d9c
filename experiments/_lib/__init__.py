"""The shared body of the experiment scripts.

* :mod:`.script`: the command line every script shares (:func:`.script.main`: run → JSON
  with provenance → report, ``--report-only``, ``--out``), recorded as
  ``python -m experiments.<folder>.<script> …``.
* :mod:`.report`: the one Markdown table (:class:`.report.Table`), the number formatters
  ("number or dash", learning rates), argparse list types, figure saving.
* :mod:`.config`: the repository root and Hydra composition of ``configs/``.
* :mod:`.sgd`: the one jittable, vmappable "SGD on an estimator" loop in ``lax.scan``.
* :mod:`.run_dirs`: the training app's run directories (metrics, summary), the data set choice.
* :mod:`.sweep`: the lr sweeps of the training app, in a subprocess or (smoke tests) in process.
* :mod:`.analysis`: reading training curves (time to a loss, T_f/T_b, curves over seeds).
"""
