"""Projects built on aim-jax that are not part of the library."""
