"""
Where a run's numbers go: out_dir/metrics.jsonl always, and wandb when wandb_log is on.

Only rank 0 tracks; other ranks get a Tracker that does nothing, so callers never check ranks.
wandb honours its own environment (WANDB_MODE=offline, WANDB_DIR, WANDB_API_KEY).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class Tracker:
    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool = True,
        wandb_log: bool = False,
        wandb_project: str = "glimpse",
        wandb_run_name: str = "",
        config: dict | None = None,
        resume_run_id: str | None = None,
        keep_through_iter: int | None = None,
    ):
        """keep_through_iter: on resume, the checkpoint's step; what the old run logged after it is dropped."""
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(out_dir) / "metrics.jsonl"
        kept = []
        if keep_through_iter is not None and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["iter"] <= keep_through_iter]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if wandb_log:
            import wandb  # imported here: it is slow to import and most runs do not log to it

            self.run = wandb.init(
                project=wandb_project,
                name=wandb_run_name or None,
                config=config,
                id=resume_run_id,
                resume="allow" if resume_run_id else None,
            )

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, record: dict):
        """Append one record (it must have 'iter') to metrics.jsonl and send it to wandb."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
