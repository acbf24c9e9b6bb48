"""Records typed both ways: what the writers write is what the readers' models hold, field for field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from repro.events import LaunchLogWriter, read_rank_log
from repro.records import STRICT_RECORDS, CallRef, HelloEvent, PhaseEvent, WaitSite
from repro.report.format import PROSE, TABLE, call_text, rank_label, ranks_text


def test_the_suite_reads_records_strictly() -> None:
    assert STRICT_RECORDS  # tests/conftest.py sets VDIAG_STRICT_RECORDS=1 for every process it starts
    with pytest.raises(ValidationError, match="no_such_field"):
        PhaseEvent.model_validate({"rank": 0, "t": 1.0, "phase": "load", "no_such_field": 1})


def test_the_replays_hello_keeps_its_gpu_fields(tmp_path: Path) -> None:
    log = LaunchLogWriter(tmp_path / "rank1.jsonl", 1)
    log.emit(HelloEvent(rank=1, pid=123, host="h", pp_stage=0, tp_rank=1, backend="flashinfer", device="cuda",
                        device_index=1, gpu_name="NVIDIA H200", shared_gpu=True))
    log.emit(PhaseEvent(rank=1, phase="capture", index=2, total=7, size=16, label="capturing"))
    with pytest.raises(ValueError, match="rank-0 record written to rank 1"):
        log.emit(PhaseEvent(rank=0, phase="load"))
    log.close()
    line = json.loads((tmp_path / "rank1.jsonl").read_text().splitlines()[0])
    assert line["ev"] == "hello" and line["gpu_name"] == "NVIDIA H200" and line["shared_gpu"] is True
    rl = read_rank_log(tmp_path / "rank1.jsonl", 1)
    assert rl.errors == []
    assert rl.hello is not None and (rl.hello.gpu_name, rl.hello.shared_gpu) == ("NVIDIA H200", True)
    assert rl.phases[0].label == "capturing"


def test_a_call_ref_round_trips_only_the_fields_it_was_given() -> None:
    ref = CallRef(phase="capture", size=16, layer=0, sub=1, call=40, oneshot=None)
    again = CallRef.model_validate_json(ref.model_dump_json())
    assert again.fields() == ref.fields() == {"phase": "capture", "size": 16, "layer": 0, "sub": 1, "call": 40,
                                              "oneshot": None}
    assert call_text(again) == "capture size=16 layer=0 sub=1 call=40 oneshot=None"
    assert not CallRef() and not CallRef.model_validate({}) and CallRef(seq=3)


def test_rank_ranges_have_one_home() -> None:
    assert ranks_text([3, 0, 1, 4], run=PROSE) == "0-1,3-4"
    assert ranks_text([0, *range(4, 64)], run=TABLE, empty="") == "0,4-63"
    assert ranks_text([], run=PROSE) == "none"
    assert rank_label([2]) == "rank 2" and rank_label([1, 2, 3]) == "ranks 1,2,3"


def test_every_wait_site_has_a_label_and_a_description() -> None:
    from repro.analysis import SITE_TEXT

    assert set(SITE_TEXT) == set(WaitSite)
    assert all(site.label for site in WaitSite)
