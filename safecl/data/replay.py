"""Replay: mix rows of an earlier source (the safety stage's data by default) into a task
stage's training data.

With n task rows and share s in (0, 1), ``m = round(s / (1 - s) * n)`` replay rows are drawn
without replacement (with replacement only if the pool is smaller than m) from the pool by a
generator seeded with ``seed``, and the mix is shuffled with the same generator: replay rows are
then a share s of the stage's rows and every task row is kept. Rows are tagged
``meta["replay"] = True``. The result depends only on (task rows, pool, s, seed).

Cost: the stage trains on n + m rows (with ``max_steps`` fixed, the same steps see a share s
of replay rows in place of task rows).
"""

from __future__ import annotations

import random
from dataclasses import replace

from safecl.data.records import Example


def replay_count(n_task: int, share: float) -> int:
    if not 0.0 < share < 1.0:
        raise ValueError(f"replay share must be in (0, 1), got {share}")
    return max(1, round(share / (1.0 - share) * n_task))


def mix_replay(task: list[Example], pool: list[Example], share: float, seed: int) -> tuple[list[Example], dict]:
    """(mixed examples, counts {task_rows, replay_rows, pool_rows, share, with_replacement})."""
    if not pool:
        raise ValueError("the replay source holds no rows")
    m = replay_count(len(task), share)
    rng = random.Random(seed)
    with_replacement = m > len(pool)
    picks = [rng.randrange(len(pool)) for _ in range(m)] if with_replacement else rng.sample(range(len(pool)), m)
    replay = [replace(pool[i], meta={**pool[i].meta, "replay": True}) for i in picks]
    mixed = list(task) + replay
    rng.shuffle(mixed)
    return mixed, {"task_rows": len(task), "replay_rows": m, "pool_rows": len(pool),
                   "share": m / (len(task) + m), "with_replacement": with_replacement}
