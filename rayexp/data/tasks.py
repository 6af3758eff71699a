"""Synthetic algorithmic tasks: graph-traversal traces (BFS / DFS), as in the CLRS-style configs of the
blockwise Hessian-spectrum study (arXiv 2402.16788; docs/methods.md, "Curvature").

Each example is a random connected undirected graph on ``n`` nodes (a random spanning tree plus extra
edges with probability ``p``), written as tokens

    BOS  u v  u v ...  SEP  s  SEP  v0 v1 ... v_{n-1}  EOS

(edge list in random order, start node ``s``, then the visiting order; neighbours are visited in
increasing order). Node ``i`` is token ``i``; BOS, SEP, EOS follow. Generation is deterministic in
the seed. Tasks carry their own vocabulary, so ``data.tokenizer`` does not apply to them.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from rayexp.config import DATA_TASKS, ConfigError



def vocab_size(n_nodes: int) -> int:
    """Node tokens plus BOS, SEP, EOS."""
    return n_nodes + 3


def random_graph(n: int, p: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Edges of a connected random graph: a random spanning tree plus Erdős–Rényi(p) extras."""
    order = rng.permutation(n)
    edges = {tuple(sorted((int(order[i]), int(order[rng.integers(i)])))) for i in range(1, n)}
    for u in range(n):
        for v in range(u + 1, n):
            if rng.random() < p:
                edges.add((u, v))
    return sorted(edges)


def traverse(n: int, edges: list[tuple[int, int]], start: int, kind: str) -> list[int]:
    """Visiting order of BFS or DFS from ``start`` (neighbours in increasing order)."""
    adj = [[] for _ in range(n)]
    for u, v in edges:
        adj[u].append(v), adj[v].append(u)
    for a in adj:
        a.sort()
    seen, order = set(), []
    if kind == "bfs":
        queue = deque([start])
        seen.add(start)
        while queue:
            u = queue.popleft()
            order.append(u)
            for v in adj[u]:
                if v not in seen:
                    seen.add(v)
                    queue.append(v)
    else:
        stack = [start]
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            order.append(u)
            stack.extend(reversed(adj[u]))
    return order


def example(kind: str, n: int, p: float, rng: np.random.Generator) -> list[int]:
    """One tokenized example of task ``kind``."""
    bos, sep, eos = n, n + 1, n + 2
    edges = random_graph(n, p, rng)
    shown = [edges[i] for i in rng.permutation(len(edges))]
    start = int(rng.integers(n))
    toks = [bos] + [t for e in shown for t in e] + [sep, start, sep]
    return toks + traverse(n, edges, start, kind) + [eos]


def generate(kind: str, n_nodes: int, n_examples: int, seed: int, p: float = 0.3) -> np.ndarray:
    """A token stream of ``n_examples`` examples of task ``kind`` (``bfs`` | ``dfs``)."""
    if kind not in DATA_TASKS:
        raise ConfigError(f"data.corpus: unknown task {kind!r}; allowed: {', '.join('task:' + t for t in DATA_TASKS)}")
    rng = np.random.default_rng(seed)
    return np.concatenate([np.asarray(example(kind, n_nodes, p, rng), dtype=np.uint16) for _ in range(n_examples)])
