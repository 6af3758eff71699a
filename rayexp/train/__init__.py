"""Training: the one-worker loop (loop.py), checkpoints, and the Ray Train glue (launch.py)."""
