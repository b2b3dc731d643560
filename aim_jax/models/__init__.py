"""Flax modules of AIM: encoders (ViT, Swin), adapters, the video classifier, and the factory."""

from aim_jax.models.factory import build_encoder, build_model  # noqa: F401
