"""
HellaSwag, completion style: which of four endings does the model find most likely after the context?

Each example is a context (an activity's first sentence or two) and four endings, one of them the
real one. The model reads context + ending, and each ending is scored by the model's cross-entropy
on the ending's tokens alone:

  acc       the ending with the lowest summed loss (the likeliest sequence; favours short endings)
  acc_norm  the ending with the lowest mean loss per token (length-normalised)

Small models are scored this way rather than by asking them to name the letter of the answer, which
they cannot do. The validation file (10,042 examples) comes from the dataset's own repository;
offline, pass a local copy of hellaswag_val.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.prepare import download
from glimpse.errors import GlimpseError, read_utf8
from glimpse.evaluation import evaluating, idle_forward
from glimpse.runtime import sum_dtype

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


@dataclass
class Example:
    context: str
    endings: list[str]  # four
    label: int  # the real ending's index


def read_examples(path: Path) -> list[Example]:
    """The examples of a HellaSwag .jsonl file (fields ctx, endings, label); a bad line is a one-line error."""
    lines = read_utf8(path, "HellaSwag file").splitlines()
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts = [record["ctx"], *record["endings"]]
            if not isinstance(record["endings"], list) or not all(isinstance(t, str) for t in texts) \
                    or not isinstance(record["label"], int | str) or isinstance(record["label"], bool):
                raise TypeError  # a null ending, endings as one string, a label of 1.7: not the official file's
            example = Example(record["ctx"], record["endings"], int(record["label"]))
        except (ValueError, KeyError, TypeError):
            raise GlimpseError(f"{path}:{number} is not a HellaSwag example (JSON with ctx, endings and label); "
                               "pass the official hellaswag_val.jsonl") from None
        if len(example.endings) != 4 or not 0 <= example.label < 4:
            raise GlimpseError(f"{path}:{number} has {len(example.endings)} endings and label {example.label}: "
                               "HellaSwag examples have four endings and a label from 0 to 3")
        examples.append(example)
    if not examples:
        raise GlimpseError(f"{path} holds no HellaSwag examples")
    return examples


def val_file(path: str, data_dir: str) -> Path:
    """The validation file: path if given, else DATA_DIR/hellaswag/hellaswag_val.jsonl, downloaded once."""
    if path:
        return Path(path)
    dest = Path(data_dir) / "hellaswag" / "hellaswag_val.jsonl"
    if not dest.exists():
        download(VAL_URL, dest, "offline, pass a local copy with --hellaswag_file=PATH/TO/hellaswag_val.jsonl")
    return dest


def rows(example: Example, tokenizer, block_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The four context + ending sequences, right-padded, and a mask of the ending tokens: (4, T) each.

    None when the tokenizer cannot read the example (a character a char-level model never saw), or when its
    context is empty: nothing would predict an ending's first token, and an ending of one token would score
    nothing at all. A context longer than block_size loses its first tokens: the ending is what is scored.
    """
    try:
        context = tokenizer.encode(example.context).tolist()
        endings = [tokenizer.encode(" " + ending).tolist() for ending in example.endings]
    except GlimpseError:
        return None
    if not context:
        return None
    width = min(block_size + 1, max(len(context) + len(e) for e in endings))  # inputs and targets: block_size + 1
    tokens = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.bool)
    for i, ending in enumerate(endings):
        ending = ending[-(width - 1):]  # an ending longer than the context window keeps its end
        row = (context + ending)[-width:]
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(row) - len(ending):len(row)] = True
    return tokens, mask


def ending_losses(model, tokens: torch.Tensor, mask: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, mean) cross-entropy of each row's ending tokens, (4,) each."""
    with ctx:
        logits, _ = model(tokens[:, :-1])  # (4, T - 1, V): position t predicts token t + 1
    losses = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (4, T - 1)
    scored = mask[:, 1:].float()  # a token is scored where it is an ending token being predicted
    summed = (losses * scored).sum(1)
    return summed, summed / scored.sum(1)


@torch.no_grad()  # not inference_mode: a sharded model would keep the weights it gathers as inference tensors
def evaluate(model, examples: list[Example], tokenizer, block_size: int, device, ctx, ddp=None,
             show_progress: bool = True) -> dict:
    """acc, acc_norm and the examples scored; under DDP each process scores every world_size-th example
    and the counts are added up."""
    mine = examples if ddp is None else ddp.share(examples)  # in lockstep, padded with None
    counts = torch.zeros(4, dtype=sum_dtype(device), device=device)  # (correct, correct_norm, scored, skipped)
    with evaluating(model):
        for example in tqdm(mine, desc="hellaswag", unit="example", disable=not show_progress or None, leave=False):
            built = None if example is None else rows(example, tokenizer, block_size)
            if built is None:
                counts[3] += example is not None
                if ddp is not None and ddp.lockstep:
                    idle_forward(model, device, ctx)
                continue
            tokens, mask = (t.to(device) for t in built)
            summed, mean = ending_losses(model, tokens, mask, ctx)
            counts[0] += int(summed.argmin()) == example.label
            counts[1] += int(mean.argmin()) == example.label
            counts[2] += 1
    if ddp is not None:
        counts = ddp.sum(counts)
    correct, correct_norm, scored, skipped = counts.tolist()
    if not scored:
        raise unreadable(examples)
    return {"hellaswag_acc": correct / scored, "hellaswag_acc_norm": correct_norm / scored,
            "hellaswag_examples": int(scored), "hellaswag_skipped": int(skipped)}


def unreadable(examples: list[Example]) -> GlimpseError:
    return GlimpseError(f"the model's tokenizer could read none of the HellaSwag examples ({len(examples):,}); score "
                        "a model with GPT-2's BPE tokens")


def check_readable(examples: list[Example], tokenizer):
    """Before a run trains, that the tokenizer reads at least one example: else every score would fail later."""
    if all(rows(example, tokenizer, 1) is None for example in examples):
        raise unreadable(examples)


def first(examples: list[Example], limit: int) -> list[Example]:
    """The first limit examples (0: all), the same ones every time."""
    return examples[:limit] if limit else examples

