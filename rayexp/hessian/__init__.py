"""Curvature engine: HVPs, Lanczos, SLQ, Hutchinson, 1-1 norm, sharded over Ray actors (ALGORITHMS.md)."""
