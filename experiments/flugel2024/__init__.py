"""Flügel et al. 2024, multi-tangent forward gradients: Fig. 3-6, the §4.5 table, lr transfer."""
