"""The modules: factorized and mixed-rank layers, which Linear layers a compression targets, and the one module swap."""
