"""``distributed=True``: global batch losses under data-parallel training, on 2 gloo processes (CPU).

One torchrun launch (``tests/distributed_worker.py``) checks, on both ranks and for unequal per-rank
batch sizes, every loss and option set against single-process training on the concatenated batch
(float64): the loss value, the input gradient of each rank's images after DDP-style averaging, and the
parameter gradients of a DistributedDataParallel model over two SGD steps.  The refusals without a
process group run here; the same launch then runs examples/ddp_train.py for one short epoch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dicetorch as dt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
TOL = 1e-10  # float64: sums of a few hundred terms, reduced in a different order


def torchrun(args, timeout=240, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::RuntimeWarning")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """One torchrun launch of the worker: (its output directory, its stdout)."""
    out = tmp_path_factory.mktemp("dist")
    proc = torchrun([os.path.join(ROOT, "tests", "distributed_worker.py"), str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def records(launch):
    out, _ = launch
    per_rank = []
    for r in range(WORLD):
        with open(out / f"rank{r}.json") as f:
            per_rank.append(json.load(f))
    for recs in per_rank:
        crashed = [r["raised"] for r in recs if r["case"] == "worker"]
        assert not crashed, crashed[0]
    return per_rank


def _errors(records, prefix, what_prefix):
    return [(r, rank) for rank, recs in enumerate(records) for r in recs
            if r["case"].startswith(prefix) and r["what"].startswith(what_prefix) and "err" in r]


@pytest.mark.parametrize("prefix", ["dice", "generalized", "tversky", "group-"])
def test_loss_value_is_the_global_one(records, prefix):
    """(a) every rank gets the single-process loss of the concatenated batch (ranks hold 2 and 3 images)."""
    errs = _errors(records, prefix, "value") + _errors(records, prefix, "module_value")
    assert errs
    bad = [(r, rank) for r, rank in errs if not r["err"] < TOL]
    assert not bad, bad


@pytest.mark.parametrize("prefix", ["dice", "generalized", "tversky", "group-"])
def test_input_gradients_match_after_averaging(records, prefix):
    """(b) each rank's input gradient, divided by W as DDP's averaging does, is the single-process one."""
    errs = _errors(records, prefix, "input_grad")
    assert errs
    bad = [(r, rank) for r, rank in errs if not r["err"] < TOL]
    assert not bad, bad


def test_ddp_parameter_gradients_match(records):
    """(b) a DDP model's averaged parameter gradients equal single-process ones, over two SGD steps."""
    errs = _errors(records, "ddp-", "param_grad") + _errors(records, "ddp-", "value")
    assert len(errs) == WORLD * 3 * 2 * 5  # ranks x losses x steps x (value + 4 parameters)
    bad = [(r, rank) for r, rank in errs if not r["err"] < TOL]
    assert not bad, bad


def test_metrics_synchronize_across_ranks(records):
    """dicetorch.metrics (logits in, ignore_index) computed on 2 ranks equal one process that saw all."""
    errs = _errors(records, "metric-", "synced_value")
    assert len(errs) == WORLD * 5
    bad = [(r, rank) for r, rank in errs if not r["err"] <= 1e-6]  # float32 sums added in another order
    assert not bad, bad
    exact = [(r, rank) for r, rank in errs if r["case"].startswith("metric-dice") and r["err"] != 0]
    assert not exact, exact  # DiceScore keeps integer counts: exact


def test_refusal_batch_false_with_process_group(records):
    """(c) distributed=True with batch=False is refused, saying why, also when a process group exists."""
    recs = [r for recs in records for r in recs if r["what"] == "batch_false"]
    assert len(recs) == WORLD * 6
    for r in recs:
        assert r["raised"] and "needs batch=True" in r["raised"], r


@pytest.mark.parametrize("fn", [dt.dice_loss, dt.generalized_dice_loss, dt.tversky_loss])
def test_refusals_without_process_group(fn):
    """(c) without an initialized process group: a ValueError that says what is missing."""
    x, t = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        fn(x, t, batch=True, distributed=True)
    with pytest.raises(ValueError, match="needs batch=True"):
        fn(x, t, distributed=True)
    with pytest.raises(ValueError, match="process_group is used only with distributed=True"):
        fn(x, t, batch=True, process_group=object())


@pytest.mark.parametrize("cls", [dt.DiceLoss, dt.GeneralizedDiceLoss, dt.TverskyLoss])
def test_module_refusals(cls):
    with pytest.raises(ValueError, match="needs batch=True"):
        cls(distributed=True)
    m = cls(batch=True, distributed=True)  # built before init_process_group: checked at call time
    assert "distributed=True" in repr(m)
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        m(torch.randn(2, 3, 4), torch.randint(0, 3, (2, 4)))


def test_batch_sums_is_local_without_distributed():
    a, b = torch.randn(4, 3, 5), torch.randn(4, 5)
    sa, sb = dt.functional.batch_sums(a, b)
    assert torch.equal(sa, a.sum(0, keepdim=True)) and torch.equal(sb, b.sum(0, keepdim=True))
    none, sb2, none2 = dt.functional.batch_sums(None, b, None)  # an unneeded optional sum stays None
    assert none is None and none2 is None and torch.equal(sb2, sb)


def test_ddp_example_smoke(launch):
    """examples/ddp_train.py on the 2 gloo processes: one short epoch, the synced metric, the PNG."""
    out, stdout = launch
    assert stdout.count("final:") == 1, stdout[-4000:]  # rank 0 reports
    assert "on 2 gloo processes" in stdout and os.path.exists(out / "example" / "triangles_ddp.png")
