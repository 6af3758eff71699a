"""Data: tokenizers, corpora, the token cache, synthetic tasks and batch sampling."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

from rayexp.config import ConfigError, DataConfig
from rayexp.data import cache_dir, corpora, get_tokenizer, load_data, load_tokens, sample_batch, tasks, use_encoding


def _cfg(tmp_path, **kw):
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def test_bytes_tokenizer_round_trips_utf8():
    tok = get_tokenizer("bytes")
    ids = tok.encode_batch(["héllo"])[0]
    assert tok.vocab_size == 256 and bytes(ids).decode("utf-8") == "héllo\n\n"


def test_gpt2_path_through_an_injected_tiktoken_encoding(tmp_path):
    """Offline stand-in for tiktoken's gpt2 files: a byte-level Encoding with one merge, real tiktoken code."""
    use_encoding("gpt2", _tiny_encoding())
    try:
        tok = get_tokenizer("gpt2")
        assert tok.vocab_size == 258 and tok.encode_batch(["the"])[0] == [256, ord("e"), 257]
        p = tmp_path / "a.txt"
        p.write_text("this and that " * 10)
        data = load_tokens(_cfg(tmp_path, corpus=f"text:{p}", tokenizer="gpt2", val_fraction=0.3), 2)
        stream = np.concatenate([data.train, data.val])
        assert stream[-1] == 257 and 256 in stream and data.vocab_size == 258
    finally:
        use_encoding("gpt2", None)


def _tiny_encoding(name="gpt2-test", eot=257):
    """A byte-level tiktoken Encoding with one merge (b"th") and an end-of-text token: real tiktoken code."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"th"] = 256
    return tiktoken.Encoding(name=name, pat_str=r"""\w+|\s+|[^\w\s]+""", mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": eot})


def test_gpt2_vocab_over_65536_is_stored_as_uint32(tmp_path):
    use_encoding("gpt2", _tiny_encoding(eot=70_000))  # n_vocab = 70001
    try:
        p = tmp_path / "a.txt"
        p.write_text("this and that " * 10)
        data = load_tokens(_cfg(tmp_path, corpus=f"text:{p}", tokenizer="gpt2", val_fraction=0.3), 2)
        assert data.vocab_size == 70_001 and data.val.dtype == np.uint32 and data.val[-1] == 70_000
    finally:
        use_encoding("gpt2", None)


def test_injected_encoding_never_shares_the_real_encodings_cache(tmp_path):
    cfg = _cfg(tmp_path, corpus="builtin", tokenizer="gpt2")
    real = cache_dir(cfg)
    use_encoding("gpt2", _tiny_encoding())
    try:
        assert cache_dir(cfg) != real
    finally:
        use_encoding("gpt2", None)
    assert cache_dir(cfg) == real


def test_gpt2_without_bpe_files_is_a_config_error(tmp_path, monkeypatch):
    """Empty tiktoken cache and a refused connection (a closed local proxy port): a one-line ConfigError.
    tiktoken's in-process registry is emptied of gpt2 for the test (another test may have loaded it)."""
    from rayexp.data import tokenizers
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    monkeypatch.delitem(tokenizers._INJECTED, "gpt2", raising=False)  # nor a stand-in another test left
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="data.tokenizer=gpt2 needs tiktoken's BPE files") as e:
        get_tokenizer("gpt2")
    assert "TIKTOKEN_CACHE_DIR" in str(e.value) and "\n" not in str(e.value)


def test_builtin_corpus_splits_and_cache_is_reused(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, corpus="builtin", val_fraction=0.1)
    first = load_tokens(cfg, 64)
    assert not first.from_cache and first.vocab_size == 256 and first.train.dtype == np.uint16
    n = len(first.train) + len(first.val)
    assert n > 400_000 and abs(len(first.val) - int(0.1 * n)) <= 1
    import pydoc_data.topics as t  # the stream is the sorted topics, each followed by a blank line
    text = "".join(t.topics[k] + "\n\n" for k in sorted(t.topics)).encode()
    assert n == len(text) and bytes(first.val[-50:].tolist()) == text[-50:]
    files = list((tmp_path / "cache").glob("*/tokens.bin"))
    mtime = files[0].stat().st_mtime_ns

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(corpora, "documents", no_tokenizing)
    second = load_tokens(cfg, 64)
    assert second.from_cache and files[0].stat().st_mtime_ns == mtime
    assert np.array_equal(first.val, second.val)
    # val_fraction only moves the split point: same cache, same stream
    third = load_tokens(_cfg(tmp_path, corpus="builtin", val_fraction=0.2), 64)
    assert third.from_cache and len(third.val) == int(0.2 * n)
    assert np.array_equal(np.concatenate([third.train, third.val]), np.concatenate([first.train, first.val]))
    assert len(list((tmp_path / "cache").glob("*/tokens.bin"))) == 1


def test_concurrent_loads_build_one_complete_cache(tmp_path):
    """Threads racing on a cold cache (~0.9 MB: they all tokenize, one rename wins): each gets the full
    stream; one cache dir, no temp dirs left."""
    import threading
    p = tmp_path / "a.txt"
    p.write_text("concurrent trials " * 50_000)
    cfg, barrier, out = _cfg(tmp_path, corpus=f"text:{p}"), threading.Barrier(4), []

    def load():
        barrier.wait()
        out.append(load_tokens(cfg, 8))
    threads = [threading.Thread(target=load) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    expected = np.frombuffer(("concurrent trials " * 50_000 + "\n\n").encode(), dtype=np.uint8)
    assert len(out) == 4 and all(np.array_equal(np.concatenate([d.train, d.val]), expected) for d in out)
    assert [q.name for q in (tmp_path / "cache").iterdir()] == [cache_dir(cfg).name]


def test_text_directory_and_parquet_corpora(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("alpha " * 50)
    (d / "b.txt").write_text("beta " * 50)
    data = load_tokens(_cfg(tmp_path, corpus=f"text:{d}"), 8)
    assert bytes(np.concatenate([data.train, data.val]).tolist()).decode().startswith("alpha alpha")
    pq.write_table(pa.table({"body": ["gamma " * 40, "delta " * 40]}), tmp_path / "x.parquet")
    data = load_tokens(_cfg(tmp_path, corpus=f"parquet:{tmp_path / 'x.parquet'}", text_column="body"), 8)
    assert b"delta" in bytes(np.concatenate([data.train, data.val]).tolist())
    with pytest.raises(ConfigError, match="data.text_column"):
        load_tokens(_cfg(tmp_path, corpus=f"parquet:{tmp_path / 'x.parquet'}", text_column="text"), 8)


def test_hf_corpus_from_a_local_dataset_folder(tmp_path):
    """``hf:NAME`` through ``datasets.load_dataset``, offline: NAME is a local folder of parquet files."""
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(pa.table({"text": ["epsilon " * 30, "zeta " * 30]}), d / "train.parquet")
    data = load_tokens(_cfg(tmp_path, corpus=f"hf:{d}"), 8)
    assert bytes(np.concatenate([data.train, data.val]).tolist()) == ("epsilon " * 30 + "\n\n" + "zeta " * 30
                                                                      + "\n\n").encode()


def test_content_change_invalidates_cache(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one two three " * 20)
    assert not load_tokens(_cfg(tmp_path, corpus=f"text:{p}"), 8).from_cache
    p.write_text("four five six " * 30)
    os.utime(p, ns=(1, 10**18))
    assert not load_tokens(_cfg(tmp_path, corpus=f"text:{p}"), 8).from_cache


@pytest.mark.parametrize("corpus, needle", [
    ("text:/no/such/file.txt", "file not found"),
    ("parquet:/no/such.parquet", "file not found"),
    ("hf:surely-not-a-local-dataset-xyz", "could not be loaded"),
])  # an unknown task:NAME is refused by DataConfig itself (tests/test_examples_data.py)
def test_bad_corpora_give_config_errors(tmp_path, corpus, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        load_tokens(_cfg(tmp_path, corpus=corpus), 8)
    assert "data.corpus" in str(e.value)


def test_too_small_corpus_names_block_size(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("short")  # 7 byte tokens with the document separator
    with pytest.raises(ConfigError, match=r"has 7 train tokens, fewer than model block_size\+2 = 66; lower block_size"):
        load_tokens(_cfg(tmp_path, corpus=f"text:{p}"), 64)
    p.write_text("x" * 198)  # 200 tokens: 180 train, 20 val
    with pytest.raises(ConfigError, match="has 20 val tokens.* raise data.val_fraction"):
        load_tokens(_cfg(tmp_path, corpus=f"text:{p}"), 19)
    data = load_tokens(_cfg(tmp_path, corpus=f"text:{p}"), 18)  # exactly one window fits the val split
    x, y = sample_batch(data.val, 18, 3, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.from_numpy(data.val[:18].astype(np.int64)).expand(3, 18))


def test_bfs_and_dfs_traces_are_correct_and_seeded():
    edges = [(0, 1), (0, 2), (1, 3), (2, 3), (3, 4)]
    assert tasks.traverse(5, edges, 0, "bfs") == [0, 1, 2, 3, 4]
    assert tasks.traverse(5, edges, 0, "dfs") == [0, 1, 3, 2, 4]
    a = tasks.generate("bfs", 8, 50, seed=1)
    assert a == tasks.generate("bfs", 8, 50, seed=1) and a != tasks.generate("bfs", 8, 50, seed=2)
    assert max(max(p + q) for p, q in a) < tasks.vocab_size(8)
    # every example's trace visits all nodes of its (connected) graph exactly once
    for _, answer in a:
        assert sorted(answer[:-1]) == list(range(8)) and answer[-1] == tasks.token(8, "<eos>")


def test_task_corpus_loads_with_its_own_vocabulary(tmp_path):
    data = load_data(_cfg(tmp_path, corpus="task:dfs", task_nodes=6, task_examples=300), 48)
    assert data.vocab_size == tasks.vocab_size(6) == 23 and data.tokenizer == "task:dfs"


def test_sample_batch_shapes_shift_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = sample_batch(tokens, 16, 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, 0], x[:, 0] + 1)
    x2, _ = sample_batch(tokens, 16, 4, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
