"""Data: corpora tokenized once into cached memmaps, example datasets, and deterministic batch sampling.

``load_data(data_cfg, block_size)`` is the one entry: a ``TokenData`` token stream (random windows) or an
``ExampleData`` of fixed-size examples (rayexp.data.examples: CLRS-text tasks, labelled text). Both answer
``count(split, block_size)`` (how many distinct draws a split has) and ``batch(split, idx, block_size)``
(those draws as (x, y) tensors), which is all the train loop and the Hessian batches use.

``load_tokens(data_cfg, block_size)`` tokenizes the corpus into
``<cache_dir>/<key>/tokens.bin`` (uint16 when the vocabulary fits, else uint32) with ``meta.json``.
The key hashes what determines the tokens: the corpus, its content fingerprint (file paths, sizes,
mtimes), the tokenizer (and any injected stand-in encoding) and the text column.
A second call maps the file and tokenizes nothing (``TokenData.from_cache``). The split is made at
load time: the last ``val_fraction`` of the stream is validation, so changing ``val_fraction`` reuses
the cache. Writes are atomic (temp dir + rename), so concurrent trials never read a half-written cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rayexp.config import ConfigError
from rayexp.data import corpora, tasks  # noqa: F401
from rayexp.data.examples import ExampleData, load_classification, load_task
from rayexp.data.tokenizers import get_tokenizer, identity, use_encoding  # noqa: F401

CACHE_VERSION = 3  # bump when tokenization changes


@dataclass
class TokenData:
    """Token streams of one corpus: ``train`` and ``val`` are 1-D uint16/uint32 memmaps."""
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: str
    corpus: str
    from_cache: bool
    metrics: tuple = ()  # a token stream logs its loss only
    n_classes = None  # no labels
    pad_id = None  # no padding

    def count(self, split: str, block_size: int) -> int:
        """Number of window starts in ``split``: 0 .. len - block_size - 2."""
        return len(self.train if split == "train" else self.val) - block_size - 1

    def batch(self, split: str, idx: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows starting at ``idx``: x = tokens[s:s+T], y = tokens[s+1:s+T+1] (int64)."""
        tokens = self.train if split == "train" else self.val
        rows = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in idx.tolist()]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


def load_data(cfg, block_size: int) -> "TokenData | ExampleData":
    """The data ``cfg`` (a ``DataConfig``) describes: the one dispatch on corpus kinds."""
    kind = cfg.corpus.partition(":")[0]
    if cfg.images:
        return load_image_data(cfg, block_size)
    if kind == "task":
        return load_task(cfg, block_size)
    if cfg.classification:
        return load_classification(cfg, block_size)
    return load_tokens(cfg, block_size)


def load_image_data(cfg, image_size: int) -> ExampleData:
    """Image classification examples of ``cfg`` at ``image_size``² (rayexp.data.images) as ExampleData."""
    from rayexp.data.images import load_images
    source = cfg.corpus[len("images:"):] if cfg.corpus.startswith("images:hf:") else cfg.corpus
    a = load_images(source, cfg.task_seed, cfg.val_fraction, image_size, cfg.task_examples, cfg.task_classes)
    return ExampleData(a.train_x, a.train_y, a.val_x, a.val_y, vocab_size=0, n_classes=a.n_classes,
                       tokenizer="none", corpus=cfg.corpus)


def draw(data, split: str, block_size: int, batch_size: int, generator: torch.Generator):
    """``batch_size`` random draws (windows or examples) of ``split``, from ``generator``."""
    return data.batch(split, torch.randint(data.count(split, block_size), (batch_size,), generator=generator),
                      block_size)


def _spec(cfg) -> dict:
    kind = cfg.corpus.partition(":")[0]
    spec = {"v": CACHE_VERSION, "corpus": cfg.corpus}
    spec.update(tokenizer=identity(cfg.tokenizer), fingerprint=corpora.fingerprint(cfg.corpus))
    if kind in ("parquet", "csv", "hf"):
        spec["column"] = cfg.text_column
    return spec


def cache_dir(cfg, spec: dict | None = None) -> Path:
    """Directory holding the cached tokens of ``cfg``: ``<data.cache_dir>/<sha1 of its spec>``."""
    key = hashlib.sha1(json.dumps(spec or _spec(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir or ".rayexp_cache").expanduser().resolve() / key


def _tokenize(cfg, out: Path) -> dict:
    tok = get_tokenizer(cfg.tokenizer)
    n, batch = 0, []
    with open(out / "tokens.bin", "wb") as f:
        def flush():
            nonlocal n
            for ids in tok.encode_batch(batch):
                np.asarray(ids, dtype=tok.dtype).tofile(f)
                n += len(ids)
            batch.clear()
        for doc in corpora.documents(cfg.corpus, cfg.text_column, hf_cache=str(out.parent / "hf")):
            batch.append(doc)
            if len(batch) >= 512:
                flush()
        flush()
    return {"n": n, "vocab_size": tok.vocab_size, "dtype": np.dtype(tok.dtype).name, "tokenizer": tok.name}


def load_tokens(cfg, block_size: int) -> TokenData:
    """Train/val token arrays of ``cfg`` (a ``DataConfig`` of a text corpus), tokenizing only on the first call."""
    spec = _spec(cfg)
    final = cache_dir(cfg, spec)
    from_cache = (final / "meta.json").is_file()
    if not from_cache:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
        try:
            meta = {**_tokenize(cfg, tmp), "spec": spec}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, final)
            except OSError:  # another process renamed its copy first: use that one
                if not (final / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((final / "meta.json").read_text())
    if meta["n"] == 0:
        raise ConfigError(f"data.corpus {cfg.corpus!r} is empty")
    tokens = np.memmap(final / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["n"],))
    n_val = int(meta["n"] * cfg.val_fraction)
    data = TokenData(tokens[:meta["n"] - n_val], tokens[meta["n"] - n_val:], meta["vocab_size"], meta["tokenizer"],
                     cfg.corpus, from_cache)
    for split, arr, fix in (("train", data.train, "lower"), ("val", data.val, "raise")):
        if len(arr) <= block_size + 1:  # sample_batch needs at least one window of block_size+1 tokens
            raise ConfigError(f"data.corpus {cfg.corpus!r} has {len(arr)} {split} tokens, fewer than model "
                              f"block_size+2 = {block_size + 2}; lower block_size, {fix} data.val_fraction "
                              f"or use a larger corpus")
    return data


def sample_batch(tokens: np.ndarray, block_size: int, batch_size: int, generator: torch.Generator):
    """``batch_size`` random windows of a token array: ``x = tokens[s:s+T]``, ``y = tokens[s+1:s+T+1]`` (int64),
    starts ``s ~ U{0, ..., len(tokens)-T-2}`` drawn from ``generator`` (``draw`` on a bare array)."""
    data = TokenData(tokens, tokens, 0, "", "", False)
    return draw(data, "train", block_size, batch_size, generator)
