"""qevo: evolutionary compression of neural networks in JAX."""
