"""Ren et al. 2023, Scaling Forward Gradient With Local Losses: the supervised table."""
