"""Studies that reproduce the measurements of Tuci, Korkmaz, Şimşekli, Birdal, "Generalization at
the Edge of Stability" (arXiv:2604.19740) at CPU scale.

* :mod:`sdopt.studies.correlation` — Kendall τ, granulated ψ and partial τ of SD and other
  measures against the generalization gap on a learning-rate × batch-size grid (digits and
  MNIST-1D MLPs, several seeds).
* :mod:`sdopt.studies.grokking_dynamics` — SD, λ_max and trace through grokking runs, with a
  permutation test of the paper's claim.
* :mod:`sdopt.studies.kendall` and :mod:`sdopt.studies.common` — rank correlations, the run
  cache and table writers.

Command line: ``sdopt study correlation|grokking [--quick] [--out DIR] [--cache DIR]``.
"""

#: datasets of the correlation study; here, not in :mod:`sdopt.studies.correlation`, so that the
#: command line can offer them without importing the study.
DATASETS = ("digits", "mnist1d")
