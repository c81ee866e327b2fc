"""The math on tensors: the solvers, sparsity-aware factorization, ranks under a budget, SVD risk, spectra.

Importing the package fills the solver table: the closed forms register in
`solvers`, the element-wise weighted ones in `weighted_solvers`.
"""

from lowrank.linalg import weighted_solvers  # noqa: F401  registers als and adam_sgd
