"""CLRS-text tasks: algorithmic problems written as a prompt and an answer of tokens (docs/methods.md,
"CLRS-text"), as in the CLRS configs of the blockwise Hessian-spectrum study (seed 001's fork, arXiv 2402.16788).

Tasks (``rayexp.config.DATA_TASKS``), each of size ``n`` (nodes, or array length):

    bfs, dfs        <bos> bfs <edges> u v u v ... <start> s <sep>   →  v0 v1 ... v_{n-1} <eos>
    minimum         <bos> minimum <key> a0 ... a_{n-1} <sep>        →  i <eos>      (first index of the minimum)
    binary_search   <bos> binary_search <key> a0 ... <target> x <sep> → i <eos>     (a sorted; i = #{a_j < x})
    insertion_sort, bubble_sort, heapsort
                    <bos> heapsort <key> a0 ... a_{n-1} <sep>       →  s_1 <step> s_2 ... <step> s_m <eos>

Graphs are random connected undirected graphs (a random spanning tree plus Erdős–Rényi(p) extras), edges
shown in random order, neighbours visited in increasing order. Keys are integers in [0, n). A sorting answer
is the algorithm's trace: the array after each step (insertion sort: each insertion; bubble sort: each pass;
heapsort: the built max-heap, then each extraction), whose last state is the sorted array. The vocabulary is
the task's own (``data.tokenizer`` does not apply): numbers 0..n are tokens 0..n, then ``SPECIALS``, then
one token per task name. Generation is deterministic in the seed.
"""
from __future__ import annotations

import bisect
from collections import deque

import numpy as np

from rayexp.config import DATA_TASKS, ConfigError

SPECIALS = ("<bos>", "<sep>", "<eos>", "<pad>", "<step>", "<key>", "<target>", "<start>", "<edges>")
SORTS = ("insertion_sort", "bubble_sort", "heapsort")


def token(n: int, name: str) -> int:
    """Id of a special token or task name in the vocabulary of size-``n`` tasks."""
    return n + 1 + (SPECIALS + DATA_TASKS).index(name)


def vocab_size(n: int) -> int:
    """Numbers 0..n, the specials, the task names."""
    return n + 1 + len(SPECIALS) + len(DATA_TASKS)


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


def _sift_down(a: list, i: int, size: int) -> None:
    while True:
        big = max((j for j in (i, 2 * i + 1, 2 * i + 2) if j < size), key=lambda j: (a[j], j == i))
        if big == i:
            return
        a[i], a[big] = a[big], a[i]
        i = big


def sort_trace(kind: str, key: list[int]) -> list[list[int]]:
    """The array after each step of insertion sort, bubble sort or heapsort (CLRS ch. 2, 6, problem 2-2)."""
    a, states = list(key), []
    if kind == "insertion_sort":
        for j in range(1, len(a)):
            v, i = a[j], j - 1
            while i >= 0 and a[i] > v:
                a[i + 1] = a[i]
                i -= 1
            a[i + 1] = v
            states.append(list(a))
    elif kind == "bubble_sort":
        for i in range(len(a) - 1):
            for j in range(len(a) - 1, i, -1):
                if a[j] < a[j - 1]:
                    a[j], a[j - 1] = a[j - 1], a[j]
            states.append(list(a))
    else:  # heapsort: build a max-heap, then move the maximum to the end n-1 times
        for i in range(len(a) // 2 - 1, -1, -1):
            _sift_down(a, i, len(a))
        states.append(list(a))
        for end in range(len(a) - 1, 0, -1):
            a[0], a[end] = a[end], a[0]
            _sift_down(a, 0, end)
            states.append(list(a))
    return states


def example(kind: str, n: int, rng: np.random.Generator, p: float = 0.3) -> tuple[list[int], list[int]]:
    """(prompt, answer) tokens of one example of task ``kind`` and size ``n`` (the module docstring's formats)."""
    t = lambda name: token(n, name)  # noqa: E731
    head = [t("<bos>"), t(kind)]
    if kind in ("bfs", "dfs"):
        edges = random_graph(n, p, rng)
        start = int(rng.integers(n))
        shown = [x for i in rng.permutation(len(edges)) for x in edges[i]]
        return head + [t("<edges>")] + shown + [t("<start>"), start, t("<sep>")], \
            traverse(n, edges, start, kind) + [t("<eos>")]
    key = [int(v) for v in rng.integers(n, size=n)]
    if kind == "minimum":
        return head + [t("<key>")] + key + [t("<sep>")], [key.index(min(key)), t("<eos>")]
    if kind == "binary_search":
        key, x = sorted(key), int(rng.integers(n))
        return head + [t("<key>")] + key + [t("<target>"), x, t("<sep>")], [bisect.bisect_left(key, x), t("<eos>")]
    if kind in SORTS:
        states = sort_trace(kind, key)
        answer = [x for s in states for x in s + [t("<step>")]]
        return head + [t("<key>")] + key + [t("<sep>")], answer[:-1] + [t("<eos>")]
    raise ConfigError(f"data.corpus: unknown task {kind!r}; allowed: {', '.join('task:' + k for k in DATA_TASKS)}")


def generate(kind: str, n: int, n_examples: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``n_examples`` (prompt, answer) examples of task ``kind``, deterministic in ``seed``."""
    if kind not in DATA_TASKS:
        raise ConfigError(f"data.corpus: unknown task {kind!r}; allowed: {', '.join('task:' + k for k in DATA_TASKS)}")
    rng = np.random.default_rng(seed)
    return [example(kind, n, rng) for _ in range(n_examples)]
