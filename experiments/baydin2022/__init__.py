"""Baydin et al. 2022, "Gradients without Backpropagation": Fig. 1-2, §5.3-5.6, the fair comparison."""
