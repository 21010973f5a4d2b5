"""Agreement between training processes: every rank must take the same decision at the same step, or the
ranks that decided differently wait for the others in the next collective until the process group times out.

One process (no process group, or a group of one): each function returns its own value.
"""

from __future__ import annotations

import math


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def every_rank(value: float | None, device) -> list[float | None]:
    """Each rank's value, indexed by rank (None where a rank had none)."""
    import torch
    import torch.distributed as dist

    if _group_size() == 1:
        return [value]
    mine = torch.tensor([0.0 if value is None else 1.0, 0.0 if value is None else float(value)],
                        dtype=torch.float64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [float(p[1]) if p[0] else None for p in parts]


def agreed_loss(losses: list[float | None]) -> tuple[float | None, list[int]]:
    """The step's loss all ranks judge (the mean over ranks; NaN if any rank's is not finite) and the ranks
    whose loss was not finite."""
    bad = [rank for rank, loss in enumerate(losses) if loss is not None and not math.isfinite(loss)]
    known = [loss for loss in losses if loss is not None]
    if not known:
        return None, bad
    if bad:
        return losses[bad[0]], bad
    return sum(known) / len(known), bad
