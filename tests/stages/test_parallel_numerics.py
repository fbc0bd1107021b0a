"""Parallel denoising (serve/stages/parallel.py) gives the one-process stage's latents: CFG-parallel and Ulysses
on 2 ranks, both on 4, gloo on CPU, for every tiny variant (2b-, 5b-, 1.5-like and the image-to-video ones), with
and without dynamic CFG, over uneven sequence shards; and the First Block Cache decides the same on every rank
where each rank alone would have decided differently."""

from __future__ import annotations

import numpy as np
import pytest

from tests.stages import parallel_ranks as pr

VARIANTS = ("2b", "5b", "1.5", "5b-i2v", "1.5-i2v")
TOLERANCE = 1e-5  # float32, max abs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from serve.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("parallel-models")
    return {v: write_tiny_model(v, root / f"tiny-{v}") for v in VARIANTS}


def _cases(*, guidance_off: bool = False) -> list[dict]:
    cases = [{"name": f"{v}/dyn={d}", "variant": v, "dynamic_cfg": d} for v in VARIANTS for d in (False, True)]
    if guidance_off:  # no CFG batch: the CFG ranks compute the same branch
        cases.append({"name": "2b/no-cfg", "variant": "2b", "dynamic_cfg": False, "guidance": 1.0})
    return cases


def _reference(models, case: dict) -> np.ndarray:
    return pr.run_case(pr.load(str(models[case["variant"]]), case), case)


def _check(models, ranks: list[dict], cases: list[dict]) -> None:
    for case in cases:
        ref = _reference(models, case)
        for rank, results in enumerate(ranks):
            got = results[case["name"]]["latents"]
            assert got.shape == ref.shape, (case["name"], rank)
            diff = float(np.abs(got - ref).max())
            assert diff <= TOLERANCE, f"{case['name']} rank {rank}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("plan", [{"cfg": 2}, {"ulysses": 2}, {"cfg": 2, "ulysses": 2}],
                         ids=["cfg2", "ulysses2", "cfg2xulysses2"])
def test_parallel_latents_match_one_process(plan, models, tmp_path):
    cases = _cases(guidance_off=plan.get("cfg", 1) > 1)
    cancelled = {"name": "5b/cancel", "variant": "5b", "dynamic_cfg": True, "steps": 5, "cancel_at": 2}
    ranks = pr.spawn(plan, models, [*cases, cancelled], tmp_path)
    _check(models, ranks, cases)
    # rank 0's cancel reaches every rank before the same step (none waits in a collective the others left)
    assert [r[cancelled["name"]]["latents"] for r in ranks] == ["cancelled before step 3 of 5"] * len(ranks)
    # the work really was split: the exchanges of each kind ran on every rank
    calls = ranks[-1][cases[0]["name"]]["calls"]
    if plan.get("cfg", 1) > 1:
        assert calls.get("cfg_all_gather") == 3, calls  # one per step
    if plan.get("ulysses", 1) > 1:
        assert calls.get("sp_all_to_all_qkv") and calls.get("sp_all_to_all_out"), calls
    assert ranks[0][cases[0]["name"]]["calls"].get("broadcast") == 3  # the cancel decision, before every step


@pytest.mark.parametrize("plan", [{"cfg": 2}, {"ulysses": 2}], ids=["cfg2", "ulysses2"])
def test_first_block_cache_decides_once_for_every_rank(plan, models, tmp_path):
    """The threshold sits between the ranks' own ratios at step 2: alone, one rank would skip the remaining blocks
    (and their collectives) while the other computed them. Agreed on the sums of all ranks, every rank takes the
    same decision, the one-process stage's, and the latents match it."""
    case = {"name": "5b/fbc", "variant": "5b", "dynamic_cfg": True, "cache": "between_ranks", "steps": 4}
    ranks = pr.spawn(plan, models, [case], tmp_path)
    threshold = ranks[0][case["name"]]["threshold"]
    assert all(r[case["name"]]["threshold"] == threshold for r in ranks)
    logs = [r[case["name"]]["cache_log"] for r in ranks]
    local_decisions = {log[1][0] > threshold for log in logs}
    assert local_decisions == {True, False}, logs  # deciding alone, the ranks would have parted ways at step 2
    decisions = [[computed for _, _, computed in log] for log in logs]
    assert all(d == decisions[0] for d in decisions), decisions
    assert decisions[0][1] is False, decisions  # the agreed ratio is below the threshold: step 2 reused the cache
    ref = _reference(models, {**case, "cache": threshold})
    for rank, results in enumerate(ranks):
        diff = float(np.abs(results[case["name"]]["latents"] - ref).max())
        assert diff <= TOLERANCE, f"rank {rank}: {diff:.3g}"


def test_a_collective_whose_peer_stalls_fails_at_the_timeout_instead_of_hanging(tmp_path):
    import socket
    import time

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(pr.rank_stalls, args=(2, port, 2.0, str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessExitedException as exc:  # gloo aborted rank 0 at the timeout: it did not wait on either
        assert exc.error_index == 0, exc
        ended = time.time()
        seen = {"outcome": str(exc), "seconds": ended - float((tmp_path / "started").read_text())}
    else:
        seen = torch.load(tmp_path / "rank0.pt")
        assert seen["outcome"] != "returned", seen
    assert 1.5 <= seen["seconds"] < 10, seen  # the group's 2 s timeout, not forever
