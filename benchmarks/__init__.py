"""Benchmarks: the model step (beside the official PyTorch AIM) and the input pipeline."""
