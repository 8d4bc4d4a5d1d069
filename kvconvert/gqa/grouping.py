"""Which old KV heads merge into each new one.

``adjacent`` groups heads in order (the usual default). ``search`` chooses, per layer, the
partition whose merges lose the least energy in the objective metric: exhaustive when the
number of partitions is small, otherwise a seeded local search of pairwise swaps starting from
the adjacent grouping. Groups are returned sorted, in order of their smallest member.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator

from .names import GROUPINGS as GROUPINGS  # the names, beside the code they name

Group = tuple[int, ...]
EXHAUSTIVE_LIMIT = 20_000


def adjacent(num_kv: int, num_groups: int) -> list[Group]:
    t = num_kv // num_groups
    return [tuple(range(g * t, (g + 1) * t)) for g in range(num_groups)]


def count_partitions(n: int, t: int) -> int:
    """Number of ways to split n items into n/t unordered groups of size t."""
    g = n // t
    return math.factorial(n) // (math.factorial(t) ** g * math.factorial(g))


def _partitions(items: tuple[int, ...], t: int) -> Iterator[list[Group]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, t - 1):
        group = (first, *others)
        remaining = tuple(i for i in rest if i not in others)
        for tail in _partitions(remaining, t):
            yield [group, *tail]


def search(
    num_kv: int, num_groups: int, cost: Callable[[Group], float], seed: int = 0
) -> list[Group]:
    """The grouping with the least total ``cost`` (summed over groups) that the search finds."""
    t = num_kv // num_groups
    if t == 1 or num_groups == 1:
        return adjacent(num_kv, num_groups)
    cache: dict[Group, float] = {}

    def c(g: Group) -> float:
        g = tuple(sorted(g))
        if g not in cache:
            cache[g] = cost(g)
        return cache[g]

    if count_partitions(num_kv, t) <= EXHAUSTIVE_LIMIT:
        best = min(_partitions(tuple(range(num_kv)), t), key=lambda p: sum(c(g) for g in p))
        return sorted(tuple(sorted(g)) for g in best)

    groups = [list(g) for g in adjacent(num_kv, num_groups)]
    rng = random.Random(seed)
    improved = True
    while improved:
        improved = False
        pairs = list(itertools.combinations(range(num_groups), 2))
        rng.shuffle(pairs)
        for ga, gb in pairs:
            base = c(tuple(groups[ga])) + c(tuple(groups[gb]))
            for ia, ib in itertools.product(range(t), range(t)):
                na, nb = list(groups[ga]), list(groups[gb])
                na[ia], nb[ib] = nb[ib], na[ia]
                if c(tuple(na)) + c(tuple(nb)) < base - 1e-12:
                    groups[ga], groups[gb] = na, nb
                    base = c(tuple(na)) + c(tuple(nb))
                    improved = True
    return sorted(tuple(sorted(g)) for g in groups)
