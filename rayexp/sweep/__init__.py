"""Sweeps on Ray Tune, tracked in MLflow (``python -m rayexp.sweep``; ``rayexp.sweep.tune.run_sweep``).

- ``plan``: which trials a sweep runs (config × seed, concrete Experiments, keys); no Ray.
- ``tune``: search algorithms, the Tuner, ``run_sweep`` (the driver).
- ``trainable``: the Tune trainable (the worker side): a Tune trial's trials in turn, curvature after training.
- ``callback``: the typed ``SweepState`` and the ``SweepCallback`` that prints progress and writes MLflow.
- ``summary``: the best config per optimizer, read back from MLflow.
- ``__main__``: the command line, ``--resume``.

Importing this package stays light (trials are unpickled on every worker): it sets Ray's output
defaults and nothing else.
"""
import os

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our callback prints progress; no Ray tables
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # small trials checkpoint often
# The driver's callback writes MLflow synchronously (one writer by design); a new child run (params, config.yaml)
# took 0.86 s on 2 busy cores, past Tune's 0.5 s "may be a performance bottleneck" threshold on every sweep.
os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "5")
