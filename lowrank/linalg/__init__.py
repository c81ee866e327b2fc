"""The math on tensors: the solvers, sparsity-aware factorization, ranks under a budget, SVD risk, spectra."""
