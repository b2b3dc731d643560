"""Benchmarks: the model step (ours and the official PyTorch AIM side by side) and the input pipeline."""
