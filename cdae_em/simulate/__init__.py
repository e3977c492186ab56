"""Simulated particles with known truth: atomic models, projections, the simulator, pre-training pairs."""
