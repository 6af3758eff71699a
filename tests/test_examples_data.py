"""Example datasets: CLRS-text tasks checked against references written here, prompt masking, labelled text
(parquet / csv, bytes and HF tokenizers, padding), the train loop's example batches, accuracy, and config errors."""
import bisect
import heapq
from collections import deque

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayexp.config import DATA_TASKS, IGNORE_INDEX, ConfigError, DataConfig, validate
from rayexp.data import ExampleData, draw, load_data, tasks
from rayexp.train.loop import correct

N = 6


def _parse(kind, prompt, answer, n=N):
    """The task's input and answer from its tokens, with the vocabulary read through tasks.token."""
    tok = {name: tasks.token(n, name) for name in tasks.SPECIALS + DATA_TASKS}
    assert prompt[:2] == [tok["<bos>"], tok[kind]] and prompt[-1] == tok["<sep>"] and answer[-1] == tok["<eos>"]
    body, ans = prompt[2:-1], answer[:-1]
    if kind in ("bfs", "dfs"):
        assert body[0] == tok["<edges>"] and body[-2] == tok["<start>"]
        flat = body[1:-2]
        return (list(zip(flat[0::2], flat[1::2])), body[-1]), ans
    assert body[0] == tok["<key>"]
    if kind == "binary_search":
        assert body[-2] == tok["<target>"]
        return (body[1:-2], body[-1]), ans
    if kind in tasks.SORTS:
        states, cur = [], []
        for t in ans:
            if t == tok["<step>"]:
                states.append(cur)
                cur = []
            else:
                cur.append(t)
        return body[1:], states + [cur]
    return body[1:], ans


def _bfs(n, edges, s):
    adj = {u: sorted({b for a, b in edges if a == u} | {a for a, b in edges if b == u}) for u in range(n)}
    order, seen, q = [], {s}, deque([s])
    while q:
        u = q.popleft()
        order.append(u)
        for v in adj[u]:
            if v not in seen:
                seen.add(v)
                q.append(v)
    return order


def _dfs(n, edges, s):
    adj = {u: sorted({b for a, b in edges if a == u} | {a for a, b in edges if b == u}) for u in range(n)}
    order, seen = [], set()

    def visit(u):  # recursive, smallest neighbour first
        seen.add(u)
        order.append(u)
        for v in adj[u]:
            if v not in seen:
                visit(v)
    visit(s)
    return order


def _is_max_heap(a):
    return all(a[i] >= a[c] for i in range(len(a)) for c in (2 * i + 1, 2 * i + 2) if c < len(a))


def _check_sort_trace(kind, key, states):
    n = len(key)
    assert states[-1] == sorted(key) and all(sorted(s) == sorted(key) for s in states)
    if kind == "insertion_sort":  # after inserting element j the prefix 0..j is the sorted first j+1 keys
        assert len(states) == n - 1
        assert all(s[:j + 2] == sorted(key[:j + 2]) and s[j + 2:] == key[j + 2:] for j, s in enumerate(states))
    elif kind == "bubble_sort":  # after pass i the first i+1 places hold the i+1 smallest keys, in order
        assert len(states) == n - 1
        assert all(s[:i + 1] == sorted(key)[:i + 1] for i, s in enumerate(states))
    else:  # heapsort: a max-heap first; after k extractions the k largest sit sorted at the end, the rest a heap
        assert len(states) == n and _is_max_heap(states[0])
        for k, s in enumerate(states[1:], start=1):
            assert s[n - k:] == sorted(key)[n - k:] and _is_max_heap(s[:n - k])
            assert s[n - k:] == heapq.nlargest(k, key)[::-1]


@pytest.mark.parametrize("kind", DATA_TASKS)
def test_every_clrs_task_answers_like_an_independent_reference(kind):
    pairs = tasks.generate(kind, N, 60, seed=3)
    assert pairs == tasks.generate(kind, N, 60, seed=3) and pairs != tasks.generate(kind, N, 60, seed=4)
    for prompt, answer in pairs:
        assert max(prompt + answer) < tasks.vocab_size(N)
        inp, ans = _parse(kind, prompt, answer)
        if kind in ("bfs", "dfs"):
            edges, s = inp
            assert ans == (_bfs if kind == "bfs" else _dfs)(N, edges, s) and sorted(ans) == list(range(N))
        elif kind == "minimum":
            assert ans == [min(range(N), key=lambda i: (inp[i], i))]
        elif kind == "binary_search":
            key, x = inp
            assert key == sorted(key) and ans == [bisect.bisect_left(key, x)]
        else:
            _check_sort_trace(kind, inp, ans)


def test_task_examples_score_the_answer_only_and_pad(tmp_path):
    cfg = DataConfig(corpus="task:bubble_sort", task_nodes=4, task_examples=50, val_fraction=0.2)
    data = load_data(cfg, 40)
    assert isinstance(data, ExampleData) and data.train_x.shape == (40, 40) and data.val_y.shape == (10, 40)
    assert data.metrics == ("accuracy",) and data.n_classes is None and data.vocab_size == tasks.vocab_size(4)
    prompt, answer = tasks.generate("bubble_sort", 4, 50, 0)[0]
    seq = prompt + answer
    x, y = data.batch("train", torch.tensor([0]), 40)
    assert x.dtype == y.dtype == torch.int64
    assert x[0, :len(seq) - 1].tolist() == seq[:-1] and (x[0, len(seq) - 1:] == data.pad_id).all()
    scored = (y[0] != IGNORE_INDEX).nonzero().flatten().tolist()
    assert scored == list(range(len(prompt) - 1, len(seq) - 1)) and y[0, scored].tolist() == answer


def test_task_longer_than_block_size_names_the_fields():
    with pytest.raises(ConfigError, match=r"raise model.block_size to at least \d+ or lower data.task_nodes"):
        load_data(DataConfig(corpus="task:insertion_sort", task_nodes=8, task_examples=5), 32)


def test_accuracy_is_exact_match_over_scored_targets():
    y = torch.tensor([[IGNORE_INDEX, 1, 2], [IGNORE_INDEX, 1, 2], [IGNORE_INDEX, IGNORE_INDEX, 0]])
    logits = torch.full((3, 3, 4), -1.0)
    for b, row in enumerate([[3, 1, 2], [0, 1, 3], [2, 2, 0]]):  # wrong on ignored positions only / one miss / right
        logits[b, torch.arange(3), torch.tensor(row)] = 1.0
    assert correct(logits, y).tolist() == [True, False, True]
    assert correct(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])).tolist() == [True, False]


def _labelled(tmp_path, fmt="parquet", n=40, pair=False):
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cat", "dog", "sun"]
    rows = [" ".join(rng.choice(words, size=rng.integers(2, 6))) for _ in range(n)]
    table = {"sentence1" if pair else "text": rows, "label": [int("cat" in r) for r in rows]}
    if pair:
        table["sentence2"] = [r.upper() for r in rows]
    path = tmp_path / f"cls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table(table), path)
    else:
        import csv
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(table))
            w.writerows(zip(*table.values()))
    return path, rows, table["label"]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_labelled_text_is_fixed_length_with_labels(tmp_path, fmt):
    path, rows, labels = _labelled(tmp_path, fmt)
    cfg = DataConfig(corpus=f"{fmt}:{path}", label_column="label", val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    data = load_data(cfg, 16)
    assert data.n_classes == 2 and data.vocab_size == 256 and data.pad_id == 0
    assert data.train_x.shape == (30, 16) and data.val_y.tolist() == labels[30:]
    ids = list((rows[0] + "\n\n").encode())[:16]
    assert data.train_x[0].tolist() == ids + [0] * (16 - len(ids))
    x, y = draw(data, "train", 16, 5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 16) and y.shape == (5,) and y.dtype == torch.int64


def test_sentence_pairs_through_an_hf_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_tokenizer

    path, rows, _ = _labelled(tmp_path, pair=True)
    tok_dir = tiny_tokenizer(tmp_path / "tok", ["red", "green", "blue", "cat", "dog", "sun"])
    data = load_data(DataConfig(corpus=f"parquet:{path}", label_column="label", tokenizer=f"hf:{tok_dir}",
                                cache_dir=str(tmp_path / "c")), 24)
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(tok_dir)(rows[0], rows[0].upper())["input_ids"]
    assert data.train_x[0, :len(ref)].tolist() == ref and (data.train_x[0, len(ref):] == data.pad_id).all()
    assert ref[0] == 0 and data.pad_id == 1  # <s> and <pad> have RoBERTa's ids


def test_label_strings_are_numbered_and_bad_columns_are_named(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b", "c", "d"], "label": ["pos", "neg", "pos", "neg"]}), tmp_path / "s.parquet")
    data = load_data(DataConfig(corpus=f"parquet:{tmp_path / 's.parquet'}", label_column="label", val_fraction=0.5), 4)
    assert data.train_y.tolist() == [1, 0] and data.n_classes == 2
    with pytest.raises(ConfigError, match="data.label_column='y' is not a column"):
        load_data(DataConfig(corpus=f"parquet:{tmp_path / 's.parquet'}", label_column="y"), 4)


def test_glue_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"data.corpus='glue:rte'") as e:
        load_data(DataConfig(corpus="glue:rte"), 16)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("raw, needle", [
    ({"data": {"corpus": "task:quicksort"}}, "unknown task 'task:quicksort'; allowed: task:bfs"),
    ({"data": {"corpus": "glue:stsb"}}, "unknown GLUE task"),
    ({"data": {"tokenizer": "hf:"}}, "data.tokenizer"),
    ({"data": {"tokenizer": "pretrained"}}, "data.tokenizer=pretrained needs model.pretrained"),
    ({"data": {"corpus": "glue:rte"}}, "needs model.kind=hf with model.hf.head=sequence_classification"),
    ({"model": {"kind": "hf", "hf": {"config": "gpt2", "head": "sequence_classification"}}}, "needs labelled data"),
    ({"model": {"kind": "hf"}}, "give exactly one of model.hf.config"),
    ({"model": {"loss": "chunked"}, "data": {"corpus": "task:bfs"}}, "model.loss=chunked"),
])
def test_model_and_data_mismatches_are_config_errors(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(raw)
