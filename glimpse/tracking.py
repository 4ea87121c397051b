"""
Where a run's numbers and pictures go: out_dir/metrics.jsonl, a picture of its loss curves beside it
(loss.png, redrawn at every eval: wandb's charts for a run without wandb), and wandb when wandb_log is on.

Only rank 0 tracks; other ranks get a Tracker that does nothing, so callers never check ranks.
wandb honours its own environment (WANDB_MODE=offline, WANDB_DIR, WANDB_API_KEY).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from glimpse.errors import GlimpseError
from glimpse.files import write_atomic, write_text

HEAD_COLUMNS = ["layer", "head", "entropy", "prev_token", "first_token", "self", "mean_distance"]
# metrics.jsonl's losses as loss.png draws them: (key, label, matplotlib format, colour); train blue, val orange
LOSS_CURVES = [("train_loss", "train, mean of the steps since the last log", "-", "#9ecae1"),
               ("eval_train_loss", "train, the evals' batches", "o--", "#1f77b4"),
               ("val_loss", "val, the evals' batches", "o-", "#ff7f0e"),
               ("final_val_loss", "val, the whole split", "*", "#d62728")]


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, leaving out lines that are not one (a line cut short when a process was
    killed or the disk filled up)."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int):
            records.append(record)
    return records


def ends_mid_line(path: Path) -> bool:
    """Whether a file's last line was cut short (a process killed as it wrote, a full disk): no newline ends it."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def loss_figure(records: list[dict], title: str):
    """The losses of metrics.jsonl's records against their steps, one curve per key of LOSS_CURVES; a matplotlib
    Figure. Records without a key, or with a loss that was not finite (written as null), leave no point."""
    from matplotlib.figure import Figure  # imported here: a run draws only at its evals

    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    for key, label, style, colour in LOSS_CURVES:
        points = [(r["iter"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            steps, losses = zip(*points)
            if key == "final_val_loss":
                label = f"{label}: {losses[-1]:.4f}"
            style = "o" if style == "-" and len(points) == 1 else style  # a line through one point draws nothing
            ax.plot(steps, losses, style, color=colour, label=label, markersize=12 if style == "*" else 4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{title}: loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    return fig


def start_wandb(**settings):
    """wandb.init(**settings), its refusals (no API key, no network, a bad project name) one line each."""
    import wandb  # imported here: it is slow to import and most runs do not log to it

    try:
        return wandb.init(**settings)
    except ValueError as e:  # its settings' own check: "1 validation error for Settings / mode / Input should be ..."
        lines = [line.strip() for line in str(e).splitlines()]
        setting, why = (lines[1], lines[2].split(" [")[0]) if len(lines) > 2 else ("a setting", lines[0])
        raise GlimpseError(f"wandb refused its {setting} setting ({why}): fix WANDB_{setting.upper()} in the "
                           "environment (or the --wandb_ flag that sets it), or drop --wandb_log") from None
    except wandb.errors.Error as e:
        why = str(e).strip().splitlines()[0]
        if why.startswith("Invalid project name"):  # a name, which no login or offline mode would mend
            raise GlimpseError(f"wandb could not start a run ({why}): give --wandb_project another name") from None
        raise GlimpseError(f"wandb could not start a run ({why}): log in with `wandb login`, or log offline with "
                           "WANDB_MODE=offline (`wandb sync` uploads it later), or drop --wandb_log") from None


class Tracker:
    def __init__(
        self,
        metrics_path: Path | None,
        *,
        enabled: bool = True,
        wandb_log: bool = False,
        wandb_project: str = "glimpse",
        wandb_run_name: str = "",
        config: dict | None = None,
        resume_run_id: str | None = None,
        keep_through_iter: int | None = None,
        redone: tuple[str, ...] = (),
        logs_at_checkpoint: bool = False,
        keep_final: bool = False,
        job_type: str = "train",
        append: bool = False,
        draw_losses: bool = False,
    ):
        """metrics_path: where metrics.jsonl goes (None: nowhere, wandb only).

        keep_through_iter: on resume, the checkpoint's step; what the old run logged after it is dropped.
        redone: the keys of the records the resumed run logs at that step again, doing the work due there that its
        checkpoint was taken before (val_loss: its eval; hellaswag_acc: its HellaSwag score): the old ones go too.
        logs_at_checkpoint: the resumed run logs at the checkpoint's step itself (that work, or a final eval).
        keep_final: the old run's final eval at the checkpoint's step stays (a finished run resumed, which does
        not score it again); otherwise a final record goes, as a finished run's final stops being final once it
        goes on.
        append: add to metrics.jsonl as it is (an evaluation of a finished run) rather than start it anew.
        draw_losses: redraw loss.png beside metrics.jsonl whenever a record brings a validation loss, and
        at once on resume.
        """
        self.enabled = enabled
        self.run = None
        self.path = metrics_path
        self.draw_losses = draw_losses and metrics_path is not None
        self.left_wandb_run: tuple[str, int] | None = None  # (id, last step): a wandb run a resume could not go on in
        self.dropped_steps: list[int] = []
        # appending after a line cut short ends that line first, or the first record would join it (both then lost)
        self.line_to_end = append and metrics_path is not None and ends_mid_line(metrics_path)
        if not enabled:
            return
        old = read_records(metrics_path) if keep_through_iter is not None and metrics_path and metrics_path.exists() \
            else []
        logged_to = max((r["iter"] for r in old), default=-1)
        # the steps the old run logged after the checkpoint, whose records go: the resumed run retraces them
        self.dropped_steps = sorted({r["iter"] for r in old if r["iter"] > keep_through_iter}) if old else []
        first_step = keep_through_iter if logs_at_checkpoint else (keep_through_iter or 0) + 1
        if wandb_log and resume_run_id and keep_through_iter is not None and logged_to >= first_step:
            # the old run logged at a step the resumed run logs at again (killed between checkpoints, or during a
            # step's work), and a resumed wandb run takes steps after its last only, dropping the others: the
            # steps retraced go to a new wandb run instead of nowhere
            self.left_wandb_run, resume_run_id = (resume_run_id, logged_to), None
        if wandb_log:  # first: a wandb that cannot start a run stops the run before metrics.jsonl is touched
            self.run = start_wandb(project=wandb_project, name=wandb_run_name or None, config=config,
                                   id=resume_run_id, resume="allow" if resume_run_id else None, job_type=job_type)
        if metrics_path is not None and not append:
            kept = [json.dumps(r) for r in old if r["iter"] <= keep_through_iter
                    and ("final_val_loss" not in r or keep_final and r["iter"] == keep_through_iter)
                    and not (r["iter"] == keep_through_iter and any(key in r for key in redone))]
            try:
                write_text(metrics_path, "".join(line + "\n" for line in kept))  # a failure leaves the old history
            except GlimpseError:
                self.close()
                raise
            if keep_through_iter is not None:
                self.draw()  # a resume's picture shows the history kept, not the steps it drops

    @classmethod
    def for_checkpoint(cls, state: dict, job_type: str, wandb_log: bool = True) -> Tracker:
        """wandb only, in the run that trained the checkpoint state (a new run in its project when it has none)."""
        return cls(None, wandb_log=wandb_log, wandb_project=state["train_config"].get("wandb_project", "glimpse"),
                   resume_run_id=state.get("wandb_run_id"), job_type=job_type)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, record: dict):
        """Append one record (it must have 'iter') to metrics.jsonl and send it to wandb."""
        if not self.enabled:
            return
        if self.path is not None:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n" * self.line_to_end + json.dumps(clean) + "\n")
                self.line_to_end = False
            except OSError as e:
                raise GlimpseError(f"could not write {self.path}: {e.strerror or e}") from None
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])
        if "val_loss" in record or "final_val_loss" in record:
            self.draw()

    def draw(self):
        """Redraw loss.png from metrics.jsonl, when draw_losses is on."""
        if not self.draw_losses:
            return
        picture, title = self.path.with_name("loss.png"), self.path.resolve().parent.name  # "." has no name
        try:
            write_atomic(picture, lambda tmp: loss_figure(read_records(self.path), title).savefig(tmp, format="png"))
        except OSError as e:  # a picture is not worth stopping a run for: said once, then not drawn again
            tqdm.write(f"warning: could not draw {picture} ({e.strerror or e}); metrics.jsonl has the same numbers",
                       file=sys.stderr)  # above the progress bar, not inside its line
            self.draw_losses = False

    def log_attention(self, folder: Path, heads: dict, prefix: str = "attention", step: int | None = None):
        """Send a dump folder's heatmaps, viewer and head metrics to wandb, one key per layer.

        Logged at every eval under the same keys, the images get a step slider in wandb's UI, so
        one can watch heads form over the run.
        """
        if self.run is None:
            return
        import wandb

        rows = [[layer["layer"], *(head[c] for c in HEAD_COLUMNS[1:])] for layer in heads["layers"]
                for head in layer["heads"]]
        payload = {f"{prefix}/heads": wandb.Table(columns=HEAD_COLUMNS, data=rows)}
        for image in sorted(folder.glob("layer_*.png")):
            payload[f"{prefix}/{image.stem}"] = wandb.Image(str(image))
        viewer = folder / "index.html"
        if viewer.exists():
            payload[f"{prefix}/viewer"] = wandb.Html(viewer, inject=False)  # a path: wandb reads the file
        self.run.log(payload, step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc):  # the wandb run is finished however the block ends, an error's included
        self.close()
