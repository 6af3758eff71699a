"""Example datasets: fixed-size (x, y) examples instead of a token stream (docs/methods.md, "Example data").

``ExampleData`` holds numpy arrays: x (N, T) int tokens or (N, 3, H, W) uint8 images; y (N, T) int targets
with ``IGNORE_INDEX`` on unscored positions, or (N,) int labels. ``batch`` turns rows into torch tensors
(integer x → int64, uint8 x → float32 / 255). Two sources live here:

- ``load_task``: a CLRS-text task (rayexp.data.tasks): x = (prompt + answer)[:-1], y = (prompt + answer)[1:]
  with the positions that predict a prompt token set to ``IGNORE_INDEX``; padded to ``block_size`` with
  ``<pad>`` (x) and ``IGNORE_INDEX`` (y). The last ``val_fraction`` of the examples is validation.
- ``load_classification``: labelled text (parquet / csv / hf folder with ``data.label_column``, or
  ``glue:NAME``) tokenized to exactly ``block_size`` tokens, truncated or padded with the tokenizer's ``pad``
  id; ``pad_id`` goes to the model, which masks those positions out of attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rayexp.config import DATA_METRICS, GLUE_TASKS, IGNORE_INDEX, ConfigError
from rayexp.data import corpora, tasks
from rayexp.data.tokenizers import Tokenizer, get_tokenizer


@dataclass
class ExampleData:
    """Train and validation examples (see the module docstring); ``metrics`` name what ``evaluate`` logs."""
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    vocab_size: int
    n_classes: Optional[int]
    tokenizer: str
    corpus: str
    metrics: tuple = DATA_METRICS
    pad_id: Optional[int] = None  # the x value of padding (masked out of a classifier's attention)

    def count(self, split: str, block_size: int) -> int:
        """Number of examples of ``split`` (what a random batch index ranges over)."""
        return len(self.train_x if split == "train" else self.val_x)

    def batch(self, split: str, idx: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``idx`` of ``split`` as tensors: x int64 (tokens) or float32 in [0, 1] (uint8 images), y int64."""
        xs, ys = (self.train_x, self.train_y) if split == "train" else (self.val_x, self.val_y)
        i = idx.numpy()
        x = torch.from_numpy(np.ascontiguousarray(xs[i]))
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.long()
        return x, torch.from_numpy(np.ascontiguousarray(ys[i])).long()


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, corpus: str) -> tuple:
    n_val = int(len(x) * val_fraction)
    if n_val < 1 or n_val == len(x):
        raise ConfigError(f"data.corpus {corpus!r} has {len(x)} examples: too few for data.val_fraction="
                          f"{val_fraction} to leave both a train and a validation example")
    return x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]


def load_task(cfg, block_size: int) -> ExampleData:
    """The CLRS-text task ``cfg.corpus = task:NAME`` as prompt-masked examples of ``block_size`` tokens."""
    kind, n = cfg.corpus.partition(":")[2], cfg.task_nodes
    pairs = tasks.generate(kind, n, cfg.task_examples, cfg.task_seed)
    longest = max(len(p) + len(a) for p, a in pairs)
    if longest - 1 > block_size:
        raise ConfigError(f"data.corpus={cfg.corpus!r} with data.task_nodes={n} has examples of {longest} tokens: "
                          f"raise model.block_size to at least {longest - 1} or lower data.task_nodes")
    pad = tasks.token(n, "<pad>")
    x = np.full((len(pairs), block_size), pad, dtype=np.int32)
    y = np.full((len(pairs), block_size), IGNORE_INDEX, dtype=np.int32)
    for r, (prompt, answer) in enumerate(pairs):
        seq = prompt + answer
        x[r, :len(seq) - 1] = seq[:-1]
        y[r, len(prompt) - 1:len(seq) - 1] = answer  # position i predicts seq[i+1]: score the answer only
    return ExampleData(*_split(x, y, cfg.val_fraction, cfg.corpus), vocab_size=tasks.vocab_size(n), n_classes=None,
                       tokenizer=f"task:{kind}", corpus=cfg.corpus, pad_id=pad)


def encode_fixed(tok: Tokenizer, texts: list[str], pairs: Optional[list[str]], block_size: int) -> np.ndarray:
    """(N, block_size) token ids of ``texts`` (and their ``pairs``), truncated or padded with ``tok.pad``. An HF
    tokenizer adds its special tokens (e.g. RoBERTa's <s> a </s></s> b </s>); bytes/gpt2 join a pair with a newline."""
    if tok.hf is not None:
        enc = tok.hf(texts, pairs, truncation=True, padding="max_length", max_length=block_size)
        ids = enc["input_ids"]
    else:
        joined = texts if pairs is None else [f"{a}\n{b}" for a, b in zip(texts, pairs)]
        ids = [row[:block_size] for row in tok.encode_batch(joined)]
    out = np.full((len(ids), block_size), tok.pad, dtype=np.int64 if tok.vocab_size > 2**31 - 1 else np.int32)
    for r, row in enumerate(ids):
        out[r, :len(row)] = row
    return out


def _columns(cfg, names: list[str]) -> tuple[str, Optional[str]]:
    """(text column, pair column or None): ``text_column`` (+ ``text_pair_column``), else sentence1/sentence2."""
    kind, _, arg = cfg.corpus.partition(":")
    if kind == "glue":
        return GLUE_TASKS[arg]
    if cfg.text_column in names:
        return cfg.text_column, cfg.text_pair_column
    if {"sentence1", "sentence2"} <= set(names):
        return "sentence1", "sentence2"
    raise ConfigError(f"data.text_column={cfg.text_column!r} is not a column of {cfg.corpus!r} (nor a "
                      f"sentence1/sentence2 pair); columns: {', '.join(names)}")


def _labels(values: list, corpus: str, column: str) -> tuple[np.ndarray, list]:
    """Integer labels 0..C-1: integers kept as they are, other values numbered in sorted order."""
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        y = np.asarray(values, dtype=np.int64)
        if y.min() < 0:
            raise ConfigError(f"data.label_column={column!r} of {corpus!r} has a negative label {int(y.min())}: "
                              f"labels must be 0..C-1 (a GLUE test split has none)")
        return y, list(range(int(y.max()) + 1))
    classes = sorted(set(map(str, values)))
    return np.asarray([classes.index(str(v)) for v in values], dtype=np.int64), classes


def load_classification(cfg, block_size: int) -> ExampleData:
    """Labelled text of ``cfg.corpus`` as (N, block_size) tokens and (N,) labels; glue:NAME uses its train and
    validation splits, other corpora hold out their last ``val_fraction`` of rows."""
    tok = get_tokenizer(cfg.tokenizer)
    hf_cache = str(Path(cfg.cache_dir or ".rayexp_cache").expanduser().resolve() / "hf")  # datasets' Arrow copies
    splits = corpora.labelled_splits(cfg.corpus, hf_cache)
    column = "label" if cfg.corpus.startswith("glue:") else cfg.label_column
    names = splits[0].column_names
    if column not in names:
        raise ConfigError(f"data.label_column={column!r} is not a column of {cfg.corpus!r}; columns: {', '.join(names)}")
    text, pair = _columns(cfg, names)
    xs, ys = [], []
    for ds in splits:
        xs.append(encode_fixed(tok, list(ds[text]), list(ds[pair]) if pair else None, block_size))
        ys.append(list(ds[column]))
    y_all, classes = _labels([v for y in ys for v in y], cfg.corpus, column)
    if len(splits) == 2:
        n = len(ys[0])
        parts = (xs[0], y_all[:n], xs[1], y_all[n:])
    else:
        parts = _split(xs[0], y_all, cfg.val_fraction, cfg.corpus)
    return ExampleData(*parts, vocab_size=tok.vocab_size, n_classes=len(classes), tokenizer=tok.name,
                       corpus=cfg.corpus, pad_id=tok.pad)
