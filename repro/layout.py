"""vLLM's rank layout: global rank = pp_stage * tp_size + tp_rank; TP groups are consecutive ranks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankPlace:
    rank: int
    pp_stage: int
    tp_rank: int
    tp_group: tuple[int, ...]
    pp_group: tuple[int, ...]

    def label(self) -> str:
        return f"rank {self.rank} (pp {self.pp_stage}, tp {self.tp_rank})"


def place(rank: int, tp: int, pp: int) -> RankPlace:
    stage, tp_rank = divmod(rank, tp)
    tp_group = tuple(range(stage * tp, (stage + 1) * tp))
    pp_group = tuple(s * tp + tp_rank for s in range(pp))
    return RankPlace(rank, stage, tp_rank, tp_group, pp_group)


def tp_groups(tp: int, pp: int) -> list[tuple[int, ...]]:
    return [tuple(range(s * tp, (s + 1) * tp)) for s in range(pp)]


def pp_groups(tp: int, pp: int) -> list[tuple[int, ...]]:
    return [tuple(s * tp + r for s in range(pp)) for r in range(tp)]


def label(rank: int, tp: int, pp: int) -> str:
    return place(rank, tp, pp).label()
