"""Tokenizers: ``bytes`` (UTF-8 bytes, vocab 256) and ``gpt2`` (tiktoken's GPT-2 BPE, vocab 50257).

tiktoken downloads the GPT-2 BPE files on first use (then caches them under ``TIKTOKEN_CACHE_DIR``);
offline without a cache, ``gpt2`` fails with a ConfigError saying so. ``use_encoding`` installs a
``tiktoken.Encoding`` under a name (tests build a small one so the gpt2 path runs offline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from rayexp.config import ConfigError

_INJECTED: dict = {}


@dataclass
class Tokenizer:
    name: str
    vocab_size: int
    encode_batch: Callable[[list[str]], list[list[int]]]
    eot: Optional[int]  # token appended after each document (None: a blank line instead)

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
    (so a stand-in encoding never shares a cache with the real one)."""
    enc = _INJECTED.get(name)
    return name if enc is None else f"{name}=injected:{enc.name}:{enc.n_vocab}"


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
    return Tokenizer(name, enc.n_vocab, encode_batch, eot)


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called ``name``: ``bytes`` or ``gpt2``."""
    if name == "bytes":
        return _bytes()
    if name == "gpt2":
        return _tiktoken(name)
    raise ConfigError(f"data.tokenizer: unknown tokenizer {name!r}; allowed: bytes, gpt2")
