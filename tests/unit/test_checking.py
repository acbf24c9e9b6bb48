"""Known inputs and result checking: right sums pass, and wrong data is explained."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

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


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 3, 64, 512, ck.ROWS_CACHED + 5])
def test_the_sims_arithmetic_matches_the_token_digests_bit_for_bit(tp: int, tokens: int) -> None:
    w = 64
    checker = ck.Checker(group=1, tp=tp, n_groups=2, width=w, eps=1e-5)
    for call in range(ck.PERIOD):
        xs = [ck.contribution(1, r, tp, call, tokens, w).reshape(-1) for r in range(tp)]
        for total in (np.stack(xs).sum(axis=0, dtype=np.float32), sum(xs[1:], xs[0].copy())):  # one-/two-shot
            outs = ck.add_and_norm(total.reshape(tokens, w), ck.residual(1, call, tokens, w), ck.gamma(w), 1e-5)
            res_out, norm = outs
            assert checker.digests_match(res_out, norm, call, outs.packed), (tp, tokens, call)  # one product
            assert checker.digests_match(res_out.copy(), norm.copy(), call), (tp, tokens, call)  # one per output


def test_packed_outputs_are_the_halves_of_one_buffer_with_the_plain_values() -> None:
    t, w = 7, 64
    total = ck.expected_sum(0, 2, 3, t, w)
    outs = ck.add_and_norm(total, ck.residual(0, 3, t, w), ck.gamma(w), 1e-5)
    res_out, norm = outs
    assert outs.packed.shape == (2 * t, w) and outs.packed.flags.c_contiguous
    assert res_out.base is outs.packed and norm.base is outs.packed
    plain = total + ck.residual(0, 3, t, w)
    assert np.array_equal(res_out, plain) and np.array_equal(norm, ck.rms_norm(plain, ck.gamma(w), 1e-5))
    assert np.array_equal(outs.packed[t:], norm) and np.array_equal(outs.packed[:t], res_out)


@pytest.mark.parametrize("packed", [True, False])
def test_digests_catch_one_element_off_and_small_fp32_noise_still_passes(packed: bool) -> None:
    t, w, tp = 33, 64, 4
    checker = ck.Checker(group=1, tp=tp, n_groups=2, width=w, eps=1e-5)
    outs = ck.add_and_norm(ck.expected_sum(1, tp, 6, t, w), ck.residual(1, 6, t, w), ck.gamma(w), 1e-5)

    def run(mutate: Callable[[np.ndarray, np.ndarray], None]) -> tuple[bool, ck.CheckResult]:
        buf = outs.packed.copy()
        res_out, norm = buf[:t], buf[t:]
        mutate(res_out, norm)
        p = buf if packed else None
        if not packed:
            res_out, norm = res_out.copy(), norm.copy()
        return checker.digests_match(res_out, norm, 6, p), checker.check(res_out, norm, 6, p)

    assert run(lambda r, n: None) == (True, ck.OK)

    def one_off(r: np.ndarray, n: np.ndarray) -> None:
        r[20, 41] += 2e-3  # one element, above the fp32 tolerance

    match, res = run(one_off)
    assert not match and not res.ok and res.first_wrong == 20 * w + 41

    def nudge(r: np.ndarray, n: np.ndarray) -> None:
        r[:] = np.nextafter(r, np.float32(np.inf))  # another summation order (gloo's) is off by an ulp

    match, res = run(nudge)
    assert not match and res.ok  # not bit-exact, still within the fp32 tolerance

    def bad_norm(r: np.ndarray, n: np.ndarray) -> None:
        n[3, 5] += 0.5  # a wrong RMSNorm output with a right residual is caught

    match, res = run(bad_norm)
    assert not match and not res.ok and res.detail == "RMSNorm output wrong" and res.first_wrong == 3 * w + 5
