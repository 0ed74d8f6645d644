"""meta_train on 2 gloo processes (started here) equals meta_train in 1 process, in fp64.

One spawn of 2 ranks runs every job (tests/dist_worker.py) so process start-up is paid once; the
single-process references run in the test process. Checked: N ranks x B/N contexts == 1 x B for
every meta_grad mode with doc shuffling and LoRA dropout on (B = 4, B = 3 uneven, B = 1 with an
idle rank); identical parameters on every rank; only rank 0 writes checkpoints and evaluates; an
exception on one rank ends both promptly and the checkpoint rank 0 wrote resumes on 1 process
exactly; a 1-process checkpoint resumes on 2 ranks exactly; trainable base weights, gradient
accumulation, and the gradient-spike guard skipping the same step on every rank.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
from dist_worker import SCENARIOS, STEPS, run_scenario

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

REL_TOL = 1e-10  # meta-gradients, and losses
# Parameters after 3 outer AdamW steps: the ~1e-12 relative differences that fp64 rounding of
# differently batched matmuls leaves in the meta-gradients (amplified by the inner AdamW) are
# amplified again by the outer AdamW wherever a gradient element is near eps; the scenarios use
# inner_eps 1e-6 and outer_eps 1e-4 to keep that small, and this bound is what is left.
PARAM_TOL = 1e-7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _assert_same_grads(got: dict, want: dict, what: str) -> None:
    """Every meta-gradient tensor equal to REL_TOL relative."""
    assert got.keys() == want.keys() and want, what
    worst = max((_rel(got[n], want[n]), n) for n in want)
    assert worst[0] <= REL_TOL, f"{what}: worst relative meta-gradient difference {worst}"


def _assert_same_params(got: dict, want: dict, what: str) -> None:
    """Parameters after the run equal to PARAM_TOL relative to the norm of all of them together.

    (Per tensor, a parameter that the outer AdamW drove to near zero would make a relative
    comparison meaningless: fp64 rounding of batched matmuls, amplified ~1e4 by the inner AdamW,
    leaves ~1e-12 relative differences in the meta-gradients.)
    """
    assert got.keys() == want.keys(), what
    scale = torch.sqrt(sum(want[n].norm() ** 2 for n in want))
    diff = torch.sqrt(sum((got[n] - want[n]).norm() ** 2 for n in want))
    worst = max(((got[n] - want[n]).abs().max().item(), n) for n in want)
    assert diff <= PARAM_TOL * scale, f"{what}: relative difference {diff / scale:.2e}; largest element diff {worst}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Everything the tests compare: 1-process references and one 2-rank spawn running every job."""
    root = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    single = {name: run_scenario(name) for name in SCENARIOS}
    # the accumulation reference: one batch of 4 without accumulation (same seeds, same data order)
    SCENARIOS["accumulate-ref"] = dict(meta_grad="checkpointed", batch_size=4)
    single["accumulate-ref"] = run_scenario("accumulate-ref")
    # a checkpoint written by 1 process, interrupted after step 1, for the 2-rank resume
    one_dir = str(root / "written-by-1")
    with pytest.raises(RuntimeError, match="planned failure"):
        run_scenario("checkpointed-B3", one_dir, fail_at=2, fail_rank=0)
    jobs = [{"id": name, "scenario": name} for name in SCENARIOS]
    jobs += [
        {"id": "fail-rank1", "scenario": "checkpointed-B3", "dir": str(root / "written-by-2"), "fail_at": 2,
         "fail_rank": 1},
        {"id": "fail-eval-rank0", "scenario": "checkpointed-B3", "dir": str(root / "eval-fails"), "fail_at": 2,
         "fail_rank": 0},
        {"id": "resume-on-2", "scenario": "checkpointed-B3", "dir": one_dir, "resume": True},
        {"id": "files", "scenario": "checkpointed-B3", "dir": str(root / "files")},
    ]
    out = str(root / "out")
    os.makedirs(out)
    mp.spawn(dist_worker.worker, args=(2, _free_port(), out, jobs), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    return {"single": single, "ranks": ranks, "root": root}


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "accumulate-ref"])
def test_two_ranks_equal_one_process(runs, name):
    r0, r1 = runs["ranks"][0][name], runs["ranks"][1][name]
    assert r0["error"] is None and r1["error"] is None, (r0.get("trace"), r1.get("trace"))
    want = runs["single"]["accumulate-ref" if name == "accumulate" else name]
    _assert_same_grads(r0["grads"], want["grads"], f"{name}: step-1 meta-gradient, 2 ranks vs 1 process")
    _assert_same_params(r0["params"], want["params"], f"{name}: rank 0 vs 1 process")
    for n in r0["params"]:  # every rank ends with identical parameters
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]
    for a, b in zip(r0["history"], want["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=REL_TOL)
        assert a["inner_loss_first"] == pytest.approx(b["inner_loss_first"], rel=REL_TOL)
        assert a["eval"] == b["eval"] == r1["history"][a["step"] - 1]["eval"]


def test_spike_guard_skips_the_same_step_on_every_rank(runs):
    single = runs["single"]["spike-guard"]["history"]
    assert [h["skipped"] for h in single] == [False, True, False]
    for r in range(2):
        got = runs["ranks"][r]["spike-guard"]["history"]
        assert [h["skipped"] for h in got] == [False, True, False], r
        assert got[1]["grad_norm"] > 10 * got[0]["grad_norm"] == got[1]["spike_limit"]


def test_accumulation_equals_a_larger_batch(runs):
    acc, ref = runs["single"]["accumulate"], runs["single"]["accumulate-ref"]
    _assert_same_grads(acc["grads"], ref["grads"], "step-1 meta-gradient, 2 x 2 accumulated vs 4 at once")
    _assert_same_params(acc["params"], ref["params"], "2 x 2 accumulated vs 4 at once")
    assert [h["contexts"] for h in acc["history"]] == [4] * STEPS


def test_trainable_base_flat_memory_equals_unrolled():
    results = {}
    for mode in ("unrolled", "checkpointed", "recomputed"):
        pm = dist_worker.build(mode, lora_dropout=0.0)
        for p in pm.hf_model.parameters():
            p.requires_grad_(True)
        pm.train()
        loss = pm.meta_loss([d["context"] for d in dist_worker.dataset(3)], [d["question"] for d in dist_worker.dataset(3)],
                            [d["answer"] for d in dist_worker.dataset(3)], seed=3)
        params = list(pm.meta_parameters()) + list(pm.hf_model.parameters())
        results[mode] = torch.autograd.grad(loss, params, allow_unused=True)
    for mode in ("checkpointed", "recomputed"):
        for g, ref in zip(results[mode], results["unrolled"]):
            if ref is None:
                assert g is None or g.abs().max() == 0
                continue
            assert _rel(g, ref) <= 1e-9, mode
    # the base gets second-order terms: without them (first order) its gradient differs
    pm = dist_worker.build("unrolled", lora_dropout=0.0, unroll="first_order")
    for p in pm.hf_model.parameters():
        p.requires_grad_(True)
    loss = pm.meta_loss([d["context"] for d in dist_worker.dataset(3)], [d["question"] for d in dist_worker.dataset(3)],
                        [d["answer"] for d in dist_worker.dataset(3)], seed=3)
    first = torch.autograd.grad(loss, list(pm.hf_model.parameters()), allow_unused=True)
    n_meta = len(list(pm.meta_parameters()))
    wte = results["unrolled"][n_meta]
    assert _rel(first[0], wte) > 1e-3


def test_chunked_head_refuses_a_trained_head():
    pm = dist_worker.build("checkpointed", lm_head_loss="chunked")
    pm.hf_model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="lm_head_loss='full'"):
        pm.meta_loss(["ctx"], ["q?"], ["a"])


def test_only_rank_zero_writes_and_evaluates(runs):
    r0, r1 = runs["ranks"][0]["files"], runs["ranks"][1]["files"]
    assert r0["calls"] == {"save": STEPS + 1, "eval": STEPS}
    assert r1["calls"] == {"save": 0, "eval": 0}
    assert sorted(os.listdir(runs["root"] / "files")) == ["last"]


@pytest.mark.parametrize("job, failing", [("fail-rank1", "rank 1"), ("fail-eval-rank0", "step 2")])
def test_a_failure_on_one_rank_ends_every_rank_and_resumes_on_one(runs, job, failing):
    r0, r1 = runs["ranks"][0][job], runs["ranks"][1][job]
    assert r0["error"] and r1["error"], (r0, r1)
    assert failing in (r0["error"] + r1["error"])
    assert max(r0["seconds"], r1["seconds"]) < 50, "a rank waited for the process-group timeout"
    if job != "fail-rank1":
        return
    # rank 0 wrote the checkpoint of the last completed step; it resumes on 1 process exactly
    resumed = run_scenario("checkpointed-B3", str(runs["root"] / "written-by-2"), resume=True)
    _assert_same_params(resumed["params"], runs["single"]["checkpointed-B3"]["params"], "2-rank checkpoint on 1")
    assert [h["step"] for h in resumed["history"]] == list(range(1, STEPS + 1))


def test_a_one_process_checkpoint_resumes_on_two_ranks(runs):
    r0 = runs["ranks"][0]["resume-on-2"]
    assert r0["error"] is None, r0.get("trace")
    _assert_same_params(r0["params"], runs["single"]["checkpointed-B3"]["params"], "1-process checkpoint on 2")


def test_meta_train_runs_unchanged_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), os.path.join(os.path.dirname(__file__), "dist_worker.py"), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    got = [json.loads((tmp_path / f"torchrun_rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1] and got[0]["world"] == 2
    single = run_scenario("checkpointed-B3")
    assert got[0]["losses"] == pytest.approx([h["loss"] for h in single["history"]], rel=REL_TOL)


def test_teardown_frees_the_group_when_a_model_load_imported_a_group_default(tmp_path):
    # torch.distributed.nn.functional binds group.WORLD in its defaults when imported; imported
    # after the group (model loading does), it held the group past destroy_process_group and gloo's
    # threads aborted a rank at interpreter exit in about one run in ten
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), os.path.join(os.path.dirname(__file__), "dist_exit_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    for r in range(2):
        got = json.loads((tmp_path / f"exit_rank{r}.json").read_text())
        assert not got["imported_early"], "the worker imported torch.distributed.nn.functional before the group"
        assert got["name"] == "run-3" and not got["initialized"]
        if got["after"] is None:
            pytest.skip("no /proc/self/task here to list threads")
        assert [t for t in got["during"] if "gloo" in t], f"rank {r}: no gloo thread to look for: {got['during']}"
        assert not [t for t in got["after"] if "gloo" in t], f"rank {r}: gloo threads outlived teardown: {got['after']}"
