"""Known inputs and result checking: right sums pass, and wrong data is explained."""

from __future__ import annotations

import numpy as np

from repro import checking as ck


def _outputs(total: np.ndarray, group: int, call: int, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    t, w = total.shape
    res_out = total + ck.residual(group, call, t, w)
    return res_out, ck.rms_norm(res_out, ck.gamma(w), eps)


def test_expected_matches_an_independent_reference() -> None:
    t, w, tp = 5, 16, 4
    xs = [ck.contribution(1, r, tp, 7, t, w) for r in range(tp)]
    ref_sum = np.sum(np.stack(xs).astype(np.float64), axis=0)
    res = ck.residual(1, 7, t, w).astype(np.float64)
    ref_out = ref_sum + res
    ref_norm = ref_out / np.sqrt(np.mean(ref_out**2, axis=-1, keepdims=True) + 1e-5) * ck.gamma(w)
    res_out, norm = _outputs(ck.expected_sum(1, tp, 7, t, w), 1, 7)
    assert np.allclose(res_out, ref_out, rtol=1e-6) and np.allclose(norm, ref_norm, rtol=1e-5)
    assert ck.check(res_out, norm, group=1, tp=tp, n_groups=2, call=7, eps=1e-5).ok


def test_inputs_are_distinct_per_rank_call_and_group() -> None:
    a = ck.contribution(0, 0, 2, 3, 4, 8)
    assert not np.array_equal(a, ck.contribution(0, 1, 2, 3, 4, 8))
    assert not np.array_equal(a, ck.contribution(0, 0, 2, 4, 4, 8))
    assert np.all(np.floor(ck.contribution(1, 0, 2, 3, 4, 8)) == 2)  # the group lives in the integer part


def test_another_groups_contribution_is_recognised_as_aliasing() -> None:
    t, w = 4, 8
    total = ck.contribution(0, 0, 2, 5, t, w) + ck.contribution(1, 1, 2, 5, t, w)  # tp rank 1's slot from group 1
    r = ck.check(*_outputs(total, 0, 5), group=0, tp=2, n_groups=2, call=5, eps=1e-5)
    assert not r.ok and r.kind == "foreign_group" and "[1]" in r.detail


def test_stale_and_missing_and_misaligned_contributions_are_told_apart() -> None:
    t, w = 6, 8
    stale = ck.contribution(0, 0, 2, 9, t, w) + ck.contribution(0, 1, 2, 8, t, w)
    r = ck.check(*_outputs(stale, 0, 9), group=0, tp=2, n_groups=1, call=9, eps=1e-5)
    assert (r.ok, r.kind) == (False, "stale")
    missing = ck.contribution(0, 0, 2, 9, t, w).copy()
    r = ck.check(*_outputs(missing, 0, 9), group=0, tp=2, n_groups=1, call=9, eps=1e-5)
    assert (r.ok, r.kind) == (False, "missing_peer")
    shifted = ck.contribution(0, 0, 2, 9, t, w) + np.roll(ck.contribution(0, 1, 2, 9, t, w), 1, axis=0)
    r = ck.check(*_outputs(shifted, 0, 9), group=0, tp=2, n_groups=1, call=9, eps=1e-5)
    assert (r.ok, r.kind) == (False, "misaligned")
    assert r.first_wrong is not None and r.n_wrong > 0 and r.max_err > 0


def test_bf16_rounding_is_within_tolerance_but_a_lost_peer_is_not() -> None:
    t, w = 8, 64
    exact = ck.expected_sum(0, 2, 3, t, w) + ck.residual(0, 3, t, w)
    # emulate bf16 storage: keep 8 bits of mantissa
    bits = exact.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    bf16 = bits.view(np.float32)
    assert ck.check(bf16, None, group=0, tp=2, n_groups=1, call=3, eps=1e-5, dtype="bf16").ok
    lost = ck.contribution(0, 0, 2, 3, t, w) + ck.residual(0, 3, t, w)
    assert not ck.check(lost, None, group=0, tp=2, n_groups=1, call=3, eps=1e-5, dtype="bf16").ok
