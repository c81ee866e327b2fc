"""Training: the fine-tuning loop and its hooks (pruning, the rank pull, the mixed-rank schedule), and importance."""
