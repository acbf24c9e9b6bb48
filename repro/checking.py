"""Known inputs and result checking for every all-reduce + residual + RMSNorm call.

Each rank's input for a call is a deterministic function of (TP group, tp rank, call id, element index),
so every rank computes the expected sum, residual and RMSNorm output locally, with no communication.

The TP group is encoded in the integer part of each value: a contribution from group g is (g + 1) plus a
fraction below 1/(2*tp). Summing the tp contributions of one call, the integer part of the sum is the sum
of the contributors' (g + 1): if it is not tp * (g + 1), some contribution came from another TP group,
which is direct evidence of aliased workspaces. The fractional part depends on the tp rank, the call and
the element, so a missing, stale (earlier call) or shifted (misaligned token offset) contribution shows
up as a mismatch there.

Checking goes from cheapest to fullest:
1. fp32 results (the sim, fp32 runs): each token's weighted sum of each output (positive weights, one
   matrix-vector product) must equal, bit for bit, the same digest of the expectation, which the sim
   reproduces exactly (same float32 operations in the same order, same RMSNorm code). A whole missing or
   foreign contribution (every value at least 1) always moves a digest; stale or shifted data, or one
   element off by more than the tolerance, moves it unless the errors cancel exactly under random weights
   or fall within the digest's own float32 rounding. The CPU backends write both outputs as the halves of
   one buffer (`Outputs`), so one product digests both. The digests read only the fresh outputs and a
   few bytes per token of expectation, so they stay cheap inside a busy replay.
2. Other dtypes (bf16/fp16 on the GPU), in one pass: each token's sum of both outputs against the expected
   sums (a missing, foreign, stale or shifted contribution moves it far outside the summed tolerance), every
   5th element of the residual output and every 7th of the RMSNorm output element by element.
3. Anything else is checked element by element against the tolerance, and wrong data is classified.

Tolerances: fp32 results must match to 1e-4 relative + 1e-5 absolute (the sim and fp32 runs); bf16/fp16
results to 1.6e-2 relative + 1/32 absolute, about two bf16 ulps at the magnitudes used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations_with_replacement

import numpy as np

FRAC_STEPS = 8  # distinct fractional levels per contribution
PERIOD = 8  # inputs repeat every PERIOD calls
NORM_STRIDE = 7  # the RMSNorm output is checked on every 7th element
SAMPLE = 5  # the fast path compares every 5th element besides every token's sum
DIGEST_SEED = 9  # seeds the token digests' weights


def _frac_unit(tp: int) -> float:
    return 1.0 / (FRAC_STEPS * 2 * tp)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class _Prefix:
    """A per-element array of which every shorter one is a prefix: computed for the longest length asked so
    far, and handed out as read-only views."""

    def __init__(self, make: Callable[[int], np.ndarray]) -> None:
        self.make = make
        self.full = _frozen(make(0))

    def __call__(self, n: int) -> np.ndarray:
        if len(self.full) < n:
            self.full = _frozen(self.make(n))
        return self.full[:n]


def _make_levels(n: int) -> np.ndarray:
    """Per-element scramble level in [0, FRAC_STEPS): not linear in the element index, so a token shift
    cannot pass for a call shift."""
    e = np.arange(n, dtype=np.int64)
    return (((e * 2654435761) % (1 << 32)) >> 13) % FRAC_STEPS


_levels = _Prefix(_make_levels)
# For each element, level * 4 + (element mod 4): what its expected residual output depends on.
_value_index = _Prefix(lambda n: _levels(n) * 4 + np.arange(n, dtype=np.int64) % 4)


def _level_values(group: int, tp_rank: int, tp: int, phase: int) -> np.ndarray:
    """What rank (group, tp_rank) feeds in at each level: (group + 1) + ((level + phase * 3 + tp_rank * 5)
    mod FRAC_STEPS) * unit, as float32."""
    shift = phase * 3 + tp_rank * 5
    return ((group + 1) + ((np.arange(FRAC_STEPS) + shift) % FRAC_STEPS) * _frac_unit(tp)).astype(np.float32)


@lru_cache(maxsize=4096)
def _contribution(group: int, tp_rank: int, tp: int, phase: int, tokens: int, width: int) -> np.ndarray:
    return _frozen(_level_values(group, tp_rank, tp, phase)[_levels(tokens * width)].reshape(tokens, width))


def contribution(group: int, tp_rank: int, tp: int, call: int, tokens: int, width: int) -> np.ndarray:
    """The input rank (group, tp_rank) feeds into call `call`: shape (tokens, width), float32, read-only.

    Values repeat with period PERIOD in the call id, which keeps the replay cheap (inputs are cached)
    while consecutive calls still differ, so data from an earlier call is recognised.
    """
    return _contribution(group, tp_rank, tp, call % PERIOD, tokens, width)


@lru_cache(maxsize=1024)
def _residual(phase: int, tokens: int, width: int) -> np.ndarray:
    e = np.arange(tokens * width, dtype=np.int64).reshape(tokens, width)
    return _frozen((((e + phase) % 4) / 1024.0).astype(np.float32))


def residual(group: int, call: int, tokens: int, width: int) -> np.ndarray:
    return _residual(call % PERIOD, tokens, width)


@lru_cache(maxsize=16)
def gamma(width: int) -> np.ndarray:
    return _frozen((1.0 + (np.arange(width) % 8) / 16.0).astype(np.float32))


def rms_norm(x: np.ndarray, g: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm in float32, into `out` where given: the sim's, the CPU reference's and the expectation's."""
    x32 = x.astype(np.float32, copy=False)
    inv = 1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return np.multiply(x32 * inv, g, out=out, dtype=np.float32)


class Outputs(tuple[np.ndarray, np.ndarray]):
    """A call's (residual_out, norm_out), made as the two halves of one C-contiguous (2 * tokens, width)
    buffer, `packed`: the checker digests both outputs with one matrix-vector product."""

    packed: np.ndarray

    def __new__(cls, packed: np.ndarray) -> Outputs:
        tokens = len(packed) // 2
        self = super().__new__(cls, (packed[:tokens], packed[tokens:]))
        self.packed = packed
        return self


def add_and_norm(total: np.ndarray, residual: np.ndarray, g: np.ndarray, eps: float) -> Outputs:
    """The fused op's epilogue on the CPU: residual_out = total + residual, then RMSNorm of it."""
    tokens, width = total.shape
    packed = np.empty((2 * tokens, width), dtype=np.float32)
    res_out = np.add(total, residual, out=packed[:tokens], dtype=np.float32)
    rms_norm(res_out, g, eps, out=packed[tokens:])
    return Outputs(packed)


@lru_cache(maxsize=4096)
def _expected_sum(group: int, tp: int, phase: int, tokens: int, width: int) -> np.ndarray:
    total = np.zeros((tokens, width), dtype=np.float32)
    for r in range(tp):
        total += _contribution(group, r, tp, phase, tokens, width)
    return _frozen(total)


def expected_sum(group: int, tp: int, call: int, tokens: int, width: int) -> np.ndarray:
    return _expected_sum(group, tp, call % PERIOD, tokens, width)


@lru_cache(maxsize=4096)
def _fast_expectation(
    group: int, tp: int, phase: int, tokens: int, width: int, eps: float, dtype: str
) -> tuple[np.ndarray, ...]:
    """Small summaries of the expectation: per-token sums of both outputs with their tolerance, and every
    SAMPLE-th element of the residual and every NORM_STRIDE-th of the norm output with theirs. Small enough to stay in the CPU's caches."""
    res_out, norm, tol_res, tol_norm = _expected_outputs(group, tp, phase, tokens, width, eps, dtype)
    row_sum = res_out.sum(axis=1, dtype=np.float64)
    row_tol = tol_res.sum(axis=1, dtype=np.float64)
    flat, nflat = res_out.reshape(-1), norm.reshape(-1)
    out = (row_sum, row_tol, flat[::SAMPLE].copy(), tol_res.reshape(-1)[::SAMPLE].copy(),
           nflat[::NORM_STRIDE].copy(), tol_norm.reshape(-1)[::NORM_STRIDE].copy(),
           norm.sum(axis=1, dtype=np.float64), tol_norm.sum(axis=1, dtype=np.float64))
    for a in out:
        a.setflags(write=False)
    return out


def _fast_ok(obs: np.ndarray, norm_out: np.ndarray | None, fast: tuple[np.ndarray, ...]) -> bool:
    """Every token's sum (a whole missing, foreign or shifted contribution moves it far outside the
    summed tolerance) and a strided sample of elements, checked in one pass over the output."""
    row_sum, row_tol, exp_s, tol_s, norm_s, tol_ns, norm_rows, norm_row_tol = fast
    if not (np.abs(obs.sum(axis=1, dtype=np.float64) - row_sum) <= row_tol).all():
        return False
    if not (np.abs(obs.reshape(-1)[::SAMPLE] - exp_s) <= tol_s).all():
        return False
    if norm_out is None:
        return True
    if not (np.abs(norm_out.sum(axis=1, dtype=np.float64) - norm_rows) <= norm_row_tol).all():
        return False
    return bool((np.abs(norm_out.reshape(-1)[::NORM_STRIDE] - norm_s) <= tol_ns).all())


@lru_cache(maxsize=16)
def _weights(width: int) -> np.ndarray:
    """Positive per-column weights in [1, 2) for the token digests: a whole missing or foreign contribution
    (every value of which is at least 1) always moves a token's weighted sum."""
    return _frozen((1.0 + np.random.default_rng(DIGEST_SEED).random(width)).astype(np.float32))


ROWS_CACHED = 1024  # calls up to this many tokens share one cached block of expected rows per phase


def _make_rows(group: int, tp: int, phase: int, tokens: int, width: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The expected fp32 residual and norm outputs, bit for bit what a correct sim returns.

    An element's expected residual output depends only on its level and its index mod 4, so it is looked up
    in a 32-entry table built with the same float32 operations, in the same order, as the replay's inputs
    and the sim's reduction.
    """
    lv = np.repeat(np.arange(FRAC_STEPS), 4)
    m = np.tile(np.arange(4), FRAC_STEPS)
    total = np.zeros(4 * FRAC_STEPS, dtype=np.float32)
    for r in range(tp):
        total += _level_values(group, r, tp, phase)[lv]
    table = total + (((m + phase) % 4) / 1024.0).astype(np.float32)
    res_out = table[_value_index(tokens * width)].reshape(tokens, width)
    return res_out, rms_norm(res_out, gamma(width), eps)


@lru_cache(maxsize=64)
def _rows_block(group: int, tp: int, phase: int, width: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    res_out, norm = _make_rows(group, tp, phase, ROWS_CACHED, width, eps)
    return _frozen(res_out), _frozen(norm)


def _expected_rows(group: int, tp: int, phase: int, tokens: int, width: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The expected outputs of a call of `tokens` tokens. Rows do not depend on the token count (the inputs
    of fewer tokens are a prefix, and RMSNorm works per token), so small calls slice one cached block."""
    if tokens > ROWS_CACHED:
        return _make_rows(group, tp, phase, tokens, width, eps)
    res_out, norm = _rows_block(group, tp, phase, width, eps)
    return res_out[:tokens], norm[:tokens]


@lru_cache(maxsize=64)
def _expected_outputs(
    group: int, tp: int, phase: int, tokens: int, width: int, eps: float, dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Expected residual and norm outputs with their per-element tolerances, cached per call shape."""
    rtol, atol = tolerance(dtype)
    res_out = _expected_sum(group, tp, phase, tokens, width) + _residual(phase, tokens, width)
    norm = rms_norm(res_out, gamma(width), eps)
    tol_res = (atol + rtol * np.abs(res_out)).astype(np.float32)
    tol_norm = (atol + 2 * rtol * np.abs(norm)).astype(np.float32)
    return _frozen(res_out), _frozen(norm), _frozen(tol_res), _frozen(tol_norm)


def tolerance(dtype: str) -> tuple[float, float]:
    return (1e-4, 1e-5) if dtype == "fp32" or dtype == "sim" else (1.6e-2, 1.0 / 32)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    max_err: float = 0.0
    n_wrong: int = 0
    first_wrong: int | None = None
    kind: str = "ok"
    detail: str = ""


OK = CheckResult(True)


class Checker:
    """One rank's checks of its calls, cheapest first; the replay makes one per run.

    fp32 results are digested (tier 1): both outputs at once when they come packed (`Outputs`), else one
    product each. The expected digests are computed once per (phase, token count) and kept as bytes.
    """

    def __init__(self, *, group: int, tp: int, n_groups: int, width: int, eps: float, dtype: str = "fp32") -> None:
        self.group, self.tp, self.n_groups, self.width, self.eps, self.dtype = group, tp, n_groups, width, eps, dtype
        self.fp32 = dtype in ("fp32", "sim")
        self._w = _weights(width)
        self._packed: dict[int, bytes] = {}  # 2 * tokens * PERIOD + phase: digests of both outputs
        self._split: dict[tuple[int, int], tuple[bytes, bytes]] = {}  # (phase, tokens): one per output

    def check(
        self, residual_out: np.ndarray, norm_out: np.ndarray | None, call: int, packed: np.ndarray | None = None
    ) -> CheckResult:
        """Check one call's outputs. `packed`, where given, is the (2 * tokens, width) buffer whose halves
        are residual_out and norm_out (`Outputs.packed`)."""
        if self.fp32 and self.digests_match(residual_out, norm_out, call, packed):
            return OK
        return self._full(residual_out, norm_out, call)

    def digests_match(
        self, residual_out: np.ndarray, norm_out: np.ndarray | None, call: int, packed: np.ndarray | None = None
    ) -> bool:
        """Tier 1: whether every token's digests equal the expectation's, bit for bit."""
        if packed is not None:
            return self._packed_ok(packed, call)
        return residual_out.shape[-1] == self.width and self._split_ok(residual_out, norm_out, call % PERIOD)

    def _packed_ok(self, packed: np.ndarray, call: int) -> bool:
        """Tier 1 on `Outputs.packed`, the replay's usual path: a dictionary lookup, one
        matrix-vector product and one comparison of bytes."""
        key = len(packed) * PERIOD + call % PERIOD
        want = self._packed.get(key)
        if want is None:
            want = self._packed[key] = self._packed_digests(call % PERIOD, len(packed) // 2)
        return np.dot(packed, self._w).tobytes() == want

    def _packed_digests(self, phase: int, tokens: int) -> bytes:
        res_out, norm = _expected_rows(self.group, self.tp, phase, tokens, self.width, self.eps)
        return np.dot(np.concatenate((res_out, norm)), self._w).tobytes()

    def _split_ok(self, residual_out: np.ndarray, norm_out: np.ndarray | None, phase: int) -> bool:
        tokens = len(residual_out)
        want = self._split.get((phase, tokens))
        if want is None:
            res_out, norm = _expected_rows(self.group, self.tp, phase, tokens, self.width, self.eps)
            want = self._split[(phase, tokens)] = (np.dot(res_out, self._w).tobytes(), np.dot(norm, self._w).tobytes())
        # A wrong dtype or layout only makes the bytes differ: the element-wise check then decides.
        if np.dot(residual_out, self._w).tobytes() != want[0]:
            return False
        return norm_out is None or np.dot(norm_out, self._w).tobytes() == want[1]

    def _full(self, residual_out: np.ndarray, norm_out: np.ndarray | None, call: int) -> CheckResult:
        """Past the digests: tier 2 for other dtypes, then every element against the tolerance, and wrong
        data classified."""
        group, tp, eps, dtype = self.group, self.tp, self.eps, self.dtype
        tokens, width = residual_out.shape
        phase = call % PERIOD
        obs = residual_out.astype(np.float32, copy=False)
        if not self.fp32 and _fast_ok(obs, norm_out, _fast_expectation(group, tp, phase, tokens, width, eps, dtype)):
            return OK
        exp_res_out, exp_norm, tol_res, tol_norm = _expected_outputs(group, tp, phase, tokens, width, eps, dtype)
        err = np.subtract(obs, exp_res_out)
        np.abs(err, out=err)
        if (err <= tol_res).all():
            if norm_out is None:
                return OK
            nerr = np.subtract(norm_out.astype(np.float32, copy=False), exp_norm)
            np.abs(nerr, out=nerr)
            nbad = nerr > tol_norm
            if not nbad.any():
                return OK
            first = int(np.flatnonzero(nbad.reshape(-1))[0])
            return CheckResult(False, float(nerr.max()), int(nbad.sum()), first, "unknown", "RMSNorm output wrong")
        res = residual(group, call, tokens, width)
        bad = err > tol_res
        flat = bad.reshape(-1)
        first = int(np.flatnonzero(flat)[0])
        kind, detail = classify(obs - res, group=group, tp=tp, n_groups=self.n_groups, call=call, bad=bad, dtype=dtype)
        return CheckResult(False, float(err.max()), int(flat.sum()), first, kind, detail)


@lru_cache(maxsize=64)
def _checker(group: int, tp: int, n_groups: int, width: int, eps: float, dtype: str) -> Checker:
    return Checker(group=group, tp=tp, n_groups=n_groups, width=width, eps=eps, dtype=dtype)


def check(
    residual_out: np.ndarray,
    norm_out: np.ndarray | None,
    *,
    group: int,
    tp: int,
    n_groups: int,
    call: int,
    eps: float,
    dtype: str = "fp32",
    packed: np.ndarray | None = None,
) -> CheckResult:
    """Check one call's outputs on the rank that received them (a `Checker` kept per rank and shape)."""
    return _checker(group, tp, n_groups, residual_out.shape[-1], eps, dtype).check(residual_out, norm_out, call, packed)


def _group_signature(total: np.ndarray) -> np.ndarray:
    return np.floor(total + 1e-3).astype(np.int64)


def _decompositions(sig: int, tp: int, n_groups: int) -> list[tuple[int, ...]]:
    out = []
    for combo in combinations_with_replacement(range(n_groups), tp):
        if sum(g + 1 for g in combo) == sig:
            out.append(combo)
    return out


def classify(
    total: np.ndarray, *, group: int, tp: int, n_groups: int, call: int, bad: np.ndarray, dtype: str = "fp32"
) -> tuple[str, str]:
    """Explain a wrong all-reduce sum: foreign_group, missing_peer, stale, misaligned or unknown."""
    tokens, width = total.shape
    rtol, atol = tolerance(dtype)
    rows = np.flatnonzero(bad.any(axis=1))
    sig = _group_signature(total[rows])
    own = tp * (group + 1)
    foreign_rows = rows[(sig != own).any(axis=1)]
    if len(foreign_rows):
        values = sorted({int(v) for v in np.unique(_group_signature(total[foreign_rows]))})[:4]
        for v in values:
            decs = [d for d in _decompositions(v, tp, n_groups) if any(g != group for g in d)]
            if decs and v != own:
                groups = sorted({g for g in decs[0] if g != group})
                return (
                    "foreign_group",
                    f"{len(foreign_rows)}/{tokens} tokens hold contributions from TP group(s) {groups} "
                    f"(group signature {v}, expected {own})",
                )
        fewer = [v for v in values if v < own]
        if fewer and all((own - v) % (group + 1) == 0 for v in fewer):
            missing = (own - fewer[0]) // (group + 1)
            return "missing_peer", f"{len(foreign_rows)}/{tokens} tokens miss {missing} peer contribution(s)"
        return "unknown", f"{len(foreign_rows)}/{tokens} tokens have an impossible group signature {values}"

    def close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(np.all(np.abs(a - b) <= atol + rtol * np.abs(b), axis=1))

    r = rows[: min(len(rows), 64)]
    t_all = total[r]
    members = [contribution(group, k, tp, call, tokens, width) for k in range(tp)]
    full = sum(members)
    assert isinstance(full, np.ndarray)
    for d in (1, 2, 3, -1):
        if call - d < 0:
            continue
        old = expected_sum(group, tp, call - d, tokens, width)[r]
        if close(t_all, old).mean() > 0.5:
            return "stale", f"results equal call {call - d}'s sum: data from {'an earlier' if d > 0 else 'a later'} call"
        for k in range(tp):
            mix = full[r] - members[k][r] + contribution(group, k, tp, call - d, tokens, width)[r]
            if close(t_all, mix).mean() > 0.5:
                return "stale", f"tp rank {k}'s contribution is from call {call - d}, not {call}"
    for k in range(tp):
        rest = full[r] - members[k][r]
        if close(t_all, rest).mean() > 0.5:
            return "missing_peer", f"tp rank {k}'s contribution is missing"
        for j in range(tp):
            for shift in (-2, -1, 1, 2):
                src = np.clip(r + shift, 0, tokens - 1)
                mix = rest + members[j][src]
                if close(t_all, mix).mean() > 0.5:
                    return (
                        "misaligned",
                        f"tp rank {k}'s slot holds tp rank {j}'s token at offset {shift:+d}: the ranks disagree on the buffer layout (token count)",
                    )
    return "misaligned", f"{len(rows)}/{tokens} tokens wrong with the right TP group: peers disagree on the data layout"
