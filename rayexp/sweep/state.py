"""The typed state of one sweep instance, saved next to Tune's own state (no Ray here: ``--resume`` reads it
before Ray is imported)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "rayexp_sweep.json"


@dataclass
class SweepState:
    """One sweep instance: what ``--resume`` reads back from ``<storage>/<run_name>/rayexp_sweep.json``."""
    run_name: str  # Tune experiment name: <sweep name>-<start time>
    sweep_id: str  # SWEEP_KEY_TAG of the parent run; part of every trial key
    raw: dict  # the sweep's raw config, paths absolute
    source: str  # where the raw config came from (file name), for error messages
    storage: str  # Ray Tune storage path
    uri: str  # MLflow tracking URI
    experiment: str  # MLflow experiment name
    parent_run_id: str

    @property
    def path(self) -> Path:
        return Path(self.storage) / self.run_name / STATE_FILE

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(dataclasses.asdict(self), indent=1, default=str))

    @classmethod
    def load(cls, path: Path) -> "SweepState":
        return cls(**json.loads(Path(path).read_text()))
