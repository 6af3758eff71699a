"""Corpora as streams of documents (strings): ``builtin``, ``text:PATH``, ``parquet:PATH``, ``csv:PATH``,
``hf:NAME[:CONFIG]``; labelled corpora (those, or ``glue:NAME``) as ``datasets`` tables (``labelled_splits``).

``builtin`` is the standard library's ``pydoc_data.topics`` (about 465 KB of English documentation,
ships with Python: needs no download). ``text:PATH`` is a file or a folder of .txt/.md files (one
document each, sorted by path). ``parquet``, ``csv``, ``hf`` and ``glue`` go through
``datasets.load_dataset`` (split ``train``, column ``data.text_column``; glue:NAME is the hub's nyu-mll/glue
with its validation split); local files and ``hf:`` local dataset folders work offline, hub names need the
hub or a filled HF cache. ``fingerprint`` identifies a corpus's content for the cache.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

from rayexp.config import CORPORA, ConfigError

SUFFIXES = {"text": (".txt", ".md"), "parquet": (".parquet",), "csv": (".csv",)}  # local file corpora
GLUE = "nyu-mll/glue"  # the hub dataset of glue:NAME


def _files(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        if files:
            return files
        raise ConfigError(f"data.corpus: directory {str(p)!r} holds no {'/'.join(suffixes)} files")
    raise ConfigError(f"data.corpus: file not found: {str(p)!r}")


def check(corpus: str, timeout: float = 5.0) -> None:
    """Raise ConfigError unless ``corpus`` can be read: its files exist, a hub dataset is cached or the hub
    answers within ``timeout`` seconds (checked before a sweep starts its trials)."""
    kind, _, arg = corpus.partition(":")
    if kind in SUFFIXES:
        _files(arg, SUFFIXES[kind])
    elif on_hub(corpus):
        name = GLUE if kind == "glue" else arg.partition(":")[0]
        if _hub_cached(name):
            return
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"data.corpus={corpus!r}: not in the Hugging Face cache and the hub is off "
                              f"(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)")
        import socket
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        except OSError as e:
            raise ConfigError(f"data.corpus={corpus!r}: not cached and huggingface.co does not answer "
                              f"within {timeout:g} s ({e})") from None


def on_hub(corpus: str) -> bool:
    """True when ``corpus`` names a Hugging Face hub dataset (``glue:NAME``, or ``hf:NAME`` not a local path)."""
    kind, _, arg = corpus.partition(":")
    return kind == "glue" or (kind == "hf" and not Path(arg.partition(":")[0]).expanduser().exists())


def _hub_cached(name: str) -> bool:
    """True when the hub dataset ``name`` has a copy in the Hugging Face hub or datasets cache."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub")) / f"datasets--{name.replace('/', '--')}"
    ds = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")) / name.replace("/", "___")
    return hub.is_dir() or ds.is_dir()


def fingerprint(corpus: str) -> str:
    """A string that changes when the corpus's content may have changed (paths, sizes, mtimes)."""
    kind, _, arg = corpus.partition(":")
    if kind in SUFFIXES:
        files = _files(arg, SUFFIXES[kind])
        return ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    if kind == "hf" and Path(arg.partition(":")[0]).expanduser().exists():  # a local dataset folder
        root = Path(arg.partition(":")[0]).expanduser()
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        return corpus + ";" + ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    if kind == "builtin":
        import pydoc_data.topics as t
        return f"pydoc_data:{len(t.topics)}:{os.path.getsize(t.__file__)}"
    return corpus


def documents(corpus: str, text_column: str = "text", hf_cache: Optional[str] = None) -> Iterator[str]:
    """Yield the corpus's documents in a fixed order (``hf_cache``: where ``datasets`` keeps its Arrow
    copy of local files; None: its default cache; hub names always use the default cache)."""
    kind, _, arg = corpus.partition(":")
    if kind == "builtin":
        import pydoc_data.topics as t
        for key in sorted(t.topics):
            yield t.topics[key]
    elif kind == "text":
        for f in _files(arg, (".txt", ".md")):
            yield f.read_text(encoding="utf-8", errors="replace")
    elif kind in ("parquet", "csv"):
        files = [str(f) for f in _files(arg, SUFFIXES[kind])]
        yield from _hf_rows(kind, None, files, text_column, corpus, hf_cache)
    elif kind == "hf":
        name, _, config = arg.partition(":")
        local = Path(name).expanduser().exists()  # a local folder: keep datasets' copy in our cache
        yield from _hf_rows(name, config or None, None, text_column, corpus, hf_cache if local else None)
    else:
        raise ConfigError(f"data.corpus: unknown corpus {corpus!r}; allowed: {', '.join(CORPORA)}")


def _load(name, config, data_files, corpus, split="train", cache=None):
    """``datasets.load_dataset(...)[split]``, or a one-line ConfigError (offline hub name, bad file, no datasets)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.corpus={corpus!r} needs the datasets package: pip install 'rayexp[hf]'") from None
    try:
        return datasets.load_dataset(name, config, data_files=data_files, split=split, cache_dir=cache)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.corpus={corpus!r} could not be loaded by datasets: {first[:200]}") from None


def labelled_splits(corpus: str, hf_cache: Optional[str] = None) -> list:
    """The ``datasets.Dataset`` tables of a labelled corpus: [train] (parquet, csv, hf), or [train, validation]
    (glue:NAME; mnli's validation_matched)."""
    kind, _, arg = corpus.partition(":")
    if kind == "glue":
        val = "validation_matched" if arg == "mnli" else "validation"
        return [_load(GLUE, arg, None, corpus, split) for split in ("train", val)]
    if kind in ("parquet", "csv"):
        return [_load(kind, None, [str(f) for f in _files(arg, SUFFIXES[kind])], corpus, cache=hf_cache)]
    if kind == "hf":
        name, _, config = arg.partition(":")
        return [_load(name, config or None, None, corpus, cache=hf_cache if Path(name).expanduser().exists() else None)]
    raise ConfigError(f"data.corpus={corpus!r} is not a labelled corpus; allowed with data.label_column: "
                      f"parquet:PATH, csv:PATH, hf:NAME, or glue:NAME")


def _hf_rows(name, config, data_files, column, corpus, cache=None) -> Iterator[str]:
    ds = _load(name, config, data_files, corpus, cache=cache)
    if column not in ds.column_names:
        raise ConfigError(f"data.text_column={column!r} is not a column of {corpus!r}; "
                          f"columns: {', '.join(ds.column_names)}")
    for batch in ds.iter(batch_size=1000):
        yield from batch[column]
