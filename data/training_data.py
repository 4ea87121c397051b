"""
The data a training run reads: its dataset (and the HellaSwag examples it scores) made sure of on each
machine, one process at a time under the machine's lock and before any process group exists, then opened.
glimpse/run.py's setup opens it; train.py prepares it first.
"""

from __future__ import annotations

from pathlib import Path

from data import hellaswag
from data.dataset import TokenData
from data.prepare import BUILTIN, ensure_dataset, lock_file, preparing
from glimpse.distributed import Distributed, machines
from glimpse.errors import GlimpseError
from glimpse.files import missing_folders, remove_empty
from glimpse.train_config import TrainConfig


def prepare_data(cfg: TrainConfig):
    """Make sure the dataset, and the HellaSwag examples when they are scored, are on this machine.

    train.py calls it before any process group exists: every process of a machine takes the machine's lock in
    turn, the first prepares or downloads, the others find the work done. Waiting for it inside the group
    instead would sit in a collective whose timeout (NCCL's watchdog: 10 minutes) is far shorter than
    preparing a real corpus. A machine of a multi-machine job cannot know when the others will be ready, so
    there the dataset must be prepared first.
    """
    folder = Path(cfg.data_dir) / cfg.dataset
    to_prepare = cfg.dataset in BUILTIN and not (folder / "meta.json").exists()
    if machines() > 1 and to_prepare:
        raise GlimpseError(f"dataset {cfg.dataset!r} is not prepared on this machine (no {folder / 'meta.json'}): "
                           f"prepare it on every machine first (python data/prepare.py --dataset={cfg.dataset}), "
                           "then start the job again")
    if not (to_prepare or cfg.hellaswag_interval):
        ensure_dataset(cfg.dataset, cfg.data_dir)  # there already, or an error that says how to make it
        return
    data_dir = Path(cfg.data_dir)
    made = missing_folders(data_dir)
    try:
        with preparing(data_dir, cfg.dataset):  # each process in turn
            ensure_dataset(cfg.dataset, cfg.data_dir)
            if cfg.hellaswag_interval:
                hellaswag.val_file(cfg.hellaswag_file, cfg.data_dir)
    except OSError as e:
        raise GlimpseError(f"could not prepare {cfg.dataset!r} in --data_dir {data_dir}: {e.strerror or e}") from None
    finally:
        if made and not (data_dir / cfg.dataset / "meta.json").exists():  # a mistyped --data_dir is not left behind
            lock_file(data_dir, cfg.dataset).unlink(missing_ok=True)
            remove_empty(made)  # those left empty: a preparation that failed part-way keeps its finished shards


def setup_data(cfg: TrainConfig, ddp: Distributed) -> tuple[TokenData, list | None]:
    """The dataset, and the HellaSwag examples when they are scored (prepared first if need be)."""
    prepare_data(cfg)  # under train.py already done, before the process group: here a quick check
    data = TokenData(Path(cfg.data_dir) / cfg.dataset)
    data.check_block_size(cfg.model.block_size)
    examples = None
    if cfg.hellaswag_interval:
        examples = hellaswag.read_examples(hellaswag.val_file(cfg.hellaswag_file, cfg.data_dir))
        examples = hellaswag.first(examples, cfg.hellaswag_examples)
        hellaswag.check_readable(examples, data.tokenizer())
    return data, examples
