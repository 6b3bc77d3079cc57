"""Experiments: configs, the one training loop, setup, sweeps and the grid runner."""
