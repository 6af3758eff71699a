"""Tokenizers: ``bytes`` (UTF-8 bytes, vocab 256), ``gpt2`` (tiktoken's GPT-2 BPE, vocab 50257) and
``hf:PATH`` (a transformers tokenizer from a local folder, e.g. a pretrained model's, or a hub name online).

tiktoken downloads the GPT-2 BPE files on first use (then caches them under ``TIKTOKEN_CACHE_DIR``);
offline without a cache, ``gpt2`` fails with a ConfigError saying so. ``use_encoding`` installs a
``tiktoken.Encoding`` under a name (tests build a small one so the gpt2 path runs offline).

``pad`` is the id that pads fixed-length examples (rayexp.data.examples): the HF tokenizer's pad token (else
its end-of-sequence token), the NUL byte for ``bytes``, the end-of-text token for ``gpt2`` (neither occurs in
an encoded text: ``encode_ordinary`` never emits it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from rayexp.config import TOKENIZERS, ConfigError

_INJECTED: dict = {}


@dataclass
class Tokenizer:
    name: str
    vocab_size: int
    encode_batch: Callable[[list[str]], list[list[int]]]
    eot: Optional[int]  # token appended after each document (None: a blank line instead)
    pad: int = 0
    hf: Any = None  # the transformers tokenizer of hf:PATH (encodes text pairs with its own special tokens)

    @property
    def dtype(self):
        return np.uint16 if self.vocab_size <= 65536 else np.uint32


def use_encoding(name: str, encoding) -> None:
    """Make ``get_tokenizer(name)`` use ``encoding`` (a ``tiktoken.Encoding``) instead of tiktoken's registry;
    ``None`` restores the registry's."""
    if encoding is None:
        _INJECTED.pop(name, None)
    else:
        _INJECTED[name] = encoding


def identity(name: str) -> str:
    """What the token cache is keyed by: ``name``, plus the injected encoding's name and size if any
    (so a stand-in encoding never shares a cache with the real one), or a local hf tokenizer's file stamps."""
    enc = _INJECTED.get(name)
    if enc is not None:
        return f"{name}=injected:{enc.name}:{enc.n_vocab}"
    folder = Path(name[3:]).expanduser() if name.startswith("hf:") else None
    if folder is not None and folder.is_dir():  # a local tokenizer: its files' sizes and mtimes
        files = sorted(f for f in folder.iterdir() if f.is_file())
        return name + ";" + ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return name


def _bytes() -> Tokenizer:
    def encode_batch(texts):
        return [list((t + "\n\n").encode("utf-8")) for t in texts]
    return Tokenizer("bytes", 256, encode_batch, None)


def _tiktoken(name: str) -> Tokenizer:
    enc = _INJECTED.get(name)
    if enc is None:
        import tiktoken
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # offline: requests.ConnectionError and friends
            raise ConfigError(f"data.tokenizer={name} needs tiktoken's BPE files, which could not be loaded "
                              f"({type(e).__name__}); set TIKTOKEN_CACHE_DIR to a cache or use tokenizer: bytes") from None
    eot = enc.eot_token

    def encode_batch(texts):
        return [ids + [eot] for ids in enc.encode_ordinary_batch(texts)]
    return Tokenizer(name, enc.n_vocab, encode_batch, eot, pad=eot)


def _transformers(path: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"data.tokenizer=hf:{path} needs transformers: pip install 'rayexp[hf]'") from None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # no such folder, offline hub name, no tokenizer files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"data.tokenizer=hf:{path} could not be loaded: {first[:200]}") from None
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    def encode_batch(texts):
        return [ids + ([eos] if eos is not None else []) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return Tokenizer(f"hf:{path}", len(tok), encode_batch, eos, pad=pad if pad is not None else 0, hf=tok)


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called ``name`` (rayexp.config.TOKENIZERS): ``bytes``, ``gpt2`` or ``hf:PATH``."""
    if name == "bytes":
        return _bytes()
    if name == "gpt2":
        return _tiktoken(name)
    if name.startswith("hf:") and name[3:]:
        return _transformers(name[3:])
    raise ConfigError(f"data.tokenizer: unknown tokenizer {name!r}; allowed: {', '.join(TOKENIZERS)}")
