"""
glimpse beside another tool doing the same job, timed in one run so that the machine's drift shifts both
alike: preparing a corpus beside a one-process tiktoken loop, and GPT-2 in glimpse beside transformers'.
bench.py runs them (--what=prepare, --what=gpt2) and prints their tables.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from glimpse.errors import GlimpseError
from glimpse.generation import generate
from glimpse.timing import interleaved_medians

REPO = Path(__file__).resolve().parents[1]
PEAK_OF_CHILD = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(code)")


def prepare_beside_tiktoken(corpus_mb: int, repeats: int, layout: str = "jsonl") -> dict:
    """data/prepare.py beside a one-process tiktoken loop, on the same generated documents: corpus_mb
    megabytes of .jsonl in 8 files, or (layout "txt") of text in one .txt file, one document that prepare.py
    reads in blocks and the loop reads whole; bench.py --what=prepare."""
    import random
    import subprocess

    from data.sources import Documents, input_files
    from data.tokenizer import GPT2Tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkjqxz") for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        n_files = 8 if layout == "jsonl" else 1
        files = [open(corpus / f"part_{i}.{layout}", "w", encoding="utf-8") for i in range(n_files)]
        written, doc = 0, 0
        while written < corpus_mb * 1_000_000:
            text = " ".join(rng.choices(words, k=rng.randint(50, 1500))) + "."
            line = json.dumps({"text": text}) + "\n" if layout == "jsonl" else ("\n\n" if doc else "") + text
            files[doc % n_files].write(line)
            written, doc = written + len(line), doc + 1
        for f in files:
            f.close()
        enc = GPT2Tokenizer().enc
        counted, peaks = [], []

        def loop():
            if layout == "txt":
                counted.append(len(enc.encode_ordinary((corpus / "part_0.txt").read_text(encoding="utf-8"))))
            else:
                counted.append(sum(len(enc.encode_ordinary(text)) for text, *_ in Documents(input_files(str(corpus)))))

        def prepare():
            shutil.rmtree(Path(tmp) / "bench", ignore_errors=True)  # every run prepares from nothing
            # a small parent process runs prepare.py and reports its children's peak: this process's own
            # memory, copied into a child for an instant before it starts prepare.py, would count otherwise
            run = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, sys.executable, "data/prepare.py",
                                  "--dataset=bench", f"--input={corpus}", "--tokenizer=gpt2", f"--data_dir={tmp}"],
                                 capture_output=True, text=True, cwd=REPO)
            if run.returncode:
                raise GlimpseError(f"prepare.py failed: {run.stderr.strip().splitlines()[-1]}")
            peaks.append(int(run.stdout.split()[-1]))  # the largest process, workers too

        cpu = torch.device("cpu")
        loop_s, prepare_s = interleaved_medians([loop, prepare], [cpu, cpu], repeats)
        meta = json.loads((Path(tmp) / "bench" / "meta.json").read_text())
    tokens = counted[0]
    prepared = meta["train_tokens"] + meta["val_tokens"] - max(meta["documents"] - 2, 0)  # less the <|endoftext|>s
    if prepared != tokens:
        raise GlimpseError(f"prepare.py wrote {prepared:,} document tokens, the loop counted {tokens:,}")
    return {"megabytes": written / 1e6, "documents": meta["documents"], "layout": layout, "tokens": tokens,
            "seconds": {"prepare": prepare_s, "loop": loop_s},
            "tokens_per_sec": {"prepare": tokens / prepare_s, "loop": tokens / loop_s}, "speedup": loop_s / prepare_s,
            "peak_mb": max(peaks) / 2**20}


def gpt2_beside_transformers(n_layer: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """GPT-2's shape (random weights, n_layer layers) in glimpse and in transformers, side by side: the logits
    after import and after export, loading a Hugging Face folder to the first generated token, and greedy
    KV-cache sampling of new_tokens after prompt_tokens; bench.py --what=gpt2."""
    try:
        import transformers
    except ImportError:
        raise GlimpseError("--what=gpt2 compares with transformers: pip install -r requirements-dev.txt") from None
    from safetensors.torch import save_file

    from glimpse.gpt2 import hf_config, hf_weights, load_pretrained

    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=n_layer)).eval()
    reference.generation_config.eos_token_id = None  # generate all new_tokens, as glimpse does
    prompt = torch.randint(50257, (1, prompt_tokens))
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        folder, exported = Path(tmp) / "gpt2", Path(tmp) / "exported"
        reference.save_pretrained(folder)
        model = load_pretrained(str(folder))
        imported = (model(prompt)[0] - reference(prompt).logits).abs().max().item()
        exported.mkdir()
        save_file(hf_weights(model), exported / "model.safetensors")
        (exported / "config.json").write_text(json.dumps(hf_config(model.config, 50256)))
        back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
        exported_diff = (back(prompt).logits - model(prompt)[0]).abs().max().item()
        del back

        def glimpse_load():
            next(generate(load_pretrained(str(folder)), prompt, 1, temperature=0.0))

        def transformers_load():
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
            hf.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)

        ours, theirs = [], []

        def glimpse_sample():
            ours[:] = [step.token.item() for step in generate(model, prompt, new_tokens, temperature=0.0)]

        def transformers_sample():
            theirs[:] = reference.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                           pad_token_id=0)[0, prompt_tokens:].tolist()

        cpu = [torch.device("cpu")] * 2
        load = interleaved_medians([glimpse_load, transformers_load], cpu, repeats)
        sample = interleaved_medians([glimpse_sample, transformers_sample], cpu, repeats)
    return {"model": asdict(model.config), "max_abs_logit_diff": {"imported": imported, "exported": exported_diff},
            "seconds": {"glimpse_load_to_first_token": load[0], "transformers_load_to_first_token": load[1],
                        "glimpse_sample": sample[0], "transformers_sample": sample[1]},
            "speedup": {"load": load[1] / load[0], "sample": sample[1] / sample[0]},
            "same_tokens": ours == theirs, "tokens_per_sec": {"glimpse": new_tokens / sample[0],
                                                             "transformers": new_tokens / sample[1]}}
