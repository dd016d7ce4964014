"""Studies that reproduce the measurements of Tuci, Korkmaz, Şimşekli, Birdal, "Generalization at
the Edge of Stability" (arXiv:2604.19740) at CPU scale.

* :mod:`sdopt.studies.correlation` — Kendall τ / granulated ψ of SD and other measures against
  the generalization gap on a learning-rate × batch-size grid (digits MLP).
* :mod:`sdopt.studies.grokking_dynamics` — SD, λ_max and trace through a grokking run, with a
  computed verdict on the jump.
* :mod:`sdopt.studies.kendall` and :mod:`sdopt.studies.common` — rank correlations, the run
  cache and table writers.

Command line: ``sdopt study correlation|grokking [--quick] [--out DIR] [--cache DIR]``.
"""
