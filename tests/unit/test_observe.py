"""The parsers of repro/observe: tqdm-style progress in output, vLLM process titles, rank identity."""

from __future__ import annotations

from repro.observe.identity import identify, infer_title_ranks, parse_title
from repro.observe.progress import ProgressScanner, find_bar


def test_tqdm_bars_are_recognised_and_dates_are_not() -> None:
    bar = "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  45%|####5     | 23/51 [00:05<00:06,  4.20it/s]"
    assert find_bar(bar) == ("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE)", 23, 51)
    assert find_bar("Capturing CUDA graphs 0/51") == ("Capturing CUDA graphs", 0, 51)
    assert find_bar("INFO 12/01 09:33:13 loading model") is None  # N > M: not a counter
    assert find_bar("see https://example.com/a/1/2 for details") is None
    assert find_bar("ratio 3/0") is None


def test_scanner_counts_new_lines_and_bar_steps_but_not_repeated_warnings() -> None:
    sc = ProgressScanner()
    assert sc.feed("INFO loading weights\n")
    warn = "WARNING No available shared memory broadcast block found in {} seconds\n"
    assert sc.feed(warn.format(60))
    assert not sc.feed(warn.format(120))  # the same shape again: not progress
    assert sc.feed("\rCapturing CUDA graphs:   0%|          | 0/3")
    assert not sc.feed("\rCapturing CUDA graphs:   0%|          | 0/3")  # redrawn, same value
    assert sc.feed("\rCapturing CUDA graphs:  33%|###       | 1/3")
    (mark,) = sc.marks()
    assert (mark.label, mark.n, mark.total, mark.updates) == ("Capturing CUDA graphs", 1, 3, 2)
    assert sc.last_lines()[-1].endswith("1/3")


def test_vllm_titles_give_role_and_parallel_ranks() -> None:
    assert parse_title("VLLM::Worker_DP1_PP1_TP0_EP3") == ("VLLM::Worker_DP1_PP1_TP0_EP3", "worker",
                                                           {"DP": 1, "PP": 1, "TP": 0, "EP": 3})
    assert parse_title("VLLM::EngineCore_DP0")[1] == "engine-core"  # type: ignore[index]
    assert parse_title("VLLM::APIServer")[1] == "api-server"  # type: ignore[index]
    assert parse_title("MYPREFIX::Worker_TP1")[2] == {"TP": 1}  # type: ignore[index]  # VLLM_PROCESS_NAME_PREFIX
    assert parse_title("/usr/bin/python3") is None
    assert parse_title("VLLM::Tokenizer") is None  # not a role vdiag knows: left unknown


def test_identity_from_environment_and_titles_with_sources() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "2,3"}
    i = identify(10, env, ["python", "train.py"], "python")
    assert (i.role, i.rank, i.local_rank, i.world_size, i.cuda_visible_devices) == ("worker", 3, 1, 4, "2,3")
    assert i.sources["rank"] == "RANK in /proc/10/environ"
    agent = identify(9, {}, ["python", "/venv/bin/torchrun", "--nproc-per-node", "4"], "torchrun")
    assert agent.role == "torchrun-agent" and agent.rank is None
    ids = {p: identify(p, {}, [t], t[:15]) for p, t in
           ((20, "VLLM::Worker_PP0_TP0"), (21, "VLLM::Worker_PP0_TP1"), (22, "VLLM::Worker_PP1_TP0"),
            (23, "VLLM::Worker_PP1_TP1"), (24, "VLLM::EngineCore"))}
    ranks = infer_title_ranks(ids)
    assert [ranks[p].rank for p in (20, 21, 22, 23)] == [0, 1, 2, 3]
    assert ranks[24].rank is None
    assert "inferred" in ranks[22].sources["rank"]
    # only the kernel's 15-character name is left (prctl): the role is known, the TP rank is cut off
    short = identify(30, {}, ["python"], "VLLM::Worker_PP")
    assert short.role == "worker" and short.sources["title"].startswith("process name")
    assert short.tp_rank is None and short.pp_rank is None and infer_title_ranks({30: short})[30].rank is None
