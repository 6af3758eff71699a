"""Data: corpora and tasks tokenized once into cached memmaps, and deterministic batch sampling.

``load_tokens(data_cfg, block_size)`` tokenizes the corpus (or generates the task) into
``<cache_dir>/<key>/tokens.bin`` (uint16 when the vocabulary fits, else uint32) with ``meta.json``.
The key hashes what determines the tokens: the corpus, its content fingerprint (file paths, sizes,
mtimes), the tokenizer (and any injected stand-in encoding), the text column, or the task parameters.
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
from rayexp.data import corpora, tasks
from rayexp.data.tokenizers import get_tokenizer, identity, use_encoding  # noqa: F401

CACHE_VERSION = 2  # bump when tokenization or task generation changes


@dataclass
class TokenData:
    """Token streams of one corpus: ``train`` and ``val`` are 1-D uint16/uint32 memmaps."""
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: str
    corpus: str
    from_cache: bool


def _spec(cfg) -> dict:
    kind = cfg.corpus.partition(":")[0]
    spec = {"v": CACHE_VERSION, "corpus": cfg.corpus}
    if kind == "task":
        spec.update(task_nodes=cfg.task_nodes, task_examples=cfg.task_examples, task_seed=cfg.task_seed)
    else:
        spec.update(tokenizer=identity(cfg.tokenizer), fingerprint=corpora.fingerprint(cfg.corpus))
        if kind in ("parquet", "hf"):
            spec["column"] = cfg.text_column
    return spec


def cache_dir(cfg, spec: dict | None = None) -> Path:
    """Directory holding the cached tokens of ``cfg``: ``<data.cache_dir>/<sha1 of its spec>``."""
    key = hashlib.sha1(json.dumps(spec or _spec(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir or ".rayexp_cache").expanduser().resolve() / key


def _tokenize(cfg, out: Path) -> dict:
    kind, _, arg = cfg.corpus.partition(":")
    if kind == "task":
        stream = tasks.generate(arg, cfg.task_nodes, cfg.task_examples, cfg.task_seed)
        stream.tofile(out / "tokens.bin")
        return {"n": len(stream), "vocab_size": tasks.vocab_size(cfg.task_nodes), "dtype": "uint16",
                "tokenizer": f"task:{arg}"}
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
    """Train/val token arrays of ``cfg`` (a ``DataConfig``), tokenizing only on the first call."""
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
    """``batch_size`` random windows: ``x = tokens[s:s+T]``, ``y = tokens[s+1:s+T+1]`` (int64), with
    starts ``s ~ U{0, ..., len(tokens)-T-2}`` drawn from ``generator`` (the train loop's convention)."""
    starts = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=generator).tolist()
    rows = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64))
    return rows[:, :-1], rows[:, 1:]
