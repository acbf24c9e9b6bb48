"""The one home of rank-range text and call text; every module that writes either imports it.

Ranges: a run of consecutive ranks collapses to "a-b" once it is at least `run` ranks long. Prose (the
analysis's sentences, the merge's notes) collapses runs of two (`PROSE`: "0-1,4"), tables collapse runs of
four (`TABLE`: "1,2,3", "0,4-63"), and `LIST` never collapses (the observed job's sentences: "0,1,2").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from repro.records import CallRef, LaunchEvent

PROSE = 2
TABLE = 4
LIST = 0


def ranks_text(ranks: Iterable[int], *, run: int = PROSE, empty: str = "none") -> str:
    """Sorted, distinct ranks; runs of at least `run` consecutive ranks as "a-b" (`run` 0: never)."""
    values = sorted(set(ranks))
    if not values:
        return empty
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if run and j - i + 1 >= run:
            parts.append(f"{values[i]}-{values[j]}")
        else:
            parts.extend(str(v) for v in values[i : j + 1])
        i = j + 1
    return ",".join(parts)


def rank_label(ranks: Sequence[int], *, run: int = TABLE, word: str = "rank") -> str:
    """"rank 0" for one rank, else "ranks 1,2,3" / "ranks 4-63"."""
    if len(set(ranks)) == 1:
        return f"{word} {ranks[0]}"
    return f"{word}s {ranks_text(ranks, run=run, empty='')}"


def format_dims(dims: tuple[int, int, int] | None) -> str:
    return "" if dims is None else "(" + ",".join(str(d) for d in dims) + ")"


CALL_FIELDS = ("phase", "size", "layer", "sub", "call", "token_num", "op", "oneshot")


def call_fields(ev: LaunchEvent, **more: Any) -> CallRef:
    """The fields that name a launch (a finding's `call`), and any `more` (a wrong result's error)."""
    return CallRef(**{k: getattr(ev, k) for k in CALL_FIELDS if getattr(ev, k) is not None}, **more)


def call_ref_text(ev: LaunchEvent | CallRef | None) -> str:
    """A launch as the analysis's sentences name it: "capture size=16 layer=3 sub=1 (call 40)"."""
    if ev is None:
        return "?"
    d = ev.model_dump() if isinstance(ev, LaunchEvent) else ev.fields()
    if d.get("layer") is None:  # a plain FlashInfer job's call: no vLLM phase or layer to name
        return f"call {d.get('call')} ({d.get('token_num', d.get('size'))} tokens)"
    return f"{d.get('phase')} size={d.get('size')} layer={d.get('layer')} sub={d.get('sub')} (call {d.get('call')})"


def pending_call_text(ev: LaunchEvent | None) -> str:
    """The call a rank launched and never returned from: "capture size=16 layer=3 sub=1 grid=(128,1,1) …"."""
    if ev is None:
        return ""
    parts = ([ev.phase, f"size={ev.size}", f"layer={ev.layer}", f"sub={ev.sub}"] if ev.layer is not None
             else [f"call={ev.call}", f"size={ev.size}"])
    if ev.token_num != ev.size:
        parts.append(f"tokens={ev.token_num}")
    if ev.op == "unfused":
        parts.append("unfused")
    elif ev.oneshot is not None:
        parts.append("oneshot" if ev.oneshot else "twoshot")
    for name, dims in (("grid", ev.grid), ("block", ev.block), ("cluster", ev.cluster)):
        if dims is not None:
            parts.append(f"{name}={format_dims(dims)}")
    return " ".join(parts)


def call_text(ref: CallRef) -> str:
    """A call described by its fields (Divergence.call, Verdict.call): "phase size=… layer=… sub=…, more=…"."""
    call = ref.fields()
    if not call:
        return ""
    head = [str(call["phase"])] if "phase" in call and "layer" in call else []  # no layer: no vLLM phase either
    for key in ("size", "layer", "sub"):
        if key in call:
            head.append(f"{key}={value_text(call[key])}")
    rest = [f"{k}={value_text(v)}" for k, v in call.items() if k not in ("phase", "size", "layer", "sub")]
    return " ".join(head + rest)


def value_text(value: Any) -> str:
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return "(" + ",".join(str(v) for v in value) + ")"
    return str(value)
