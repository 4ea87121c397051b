"""Corpora and tokenizers: prepare.py writes datasets, dataset.py reads them, tokenizer.py encodes."""
