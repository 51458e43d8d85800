"""One rank of tests/test_distributed.py: ``python -m torch.distributed.run --nproc_per_node=2 THIS OUTDIR``.

Every rank builds the same global batch (float64, seeded), takes its slice (unequal sizes: rank r gets
``SPLIT[r]`` images) and compares, for every loss with ``batch=True, distributed=True``:

* the loss value with single-process training on the whole batch (computed locally, no communication);
* the input gradient of its slice: ``grad / W`` (what DDP-style averaging divides by) with the
  single-process gradient of those images;
* a small conv net wrapped in DistributedDataParallel: the parameter gradients after DDP's averaging
  with the single-process ones;

and that the refusals hold with a process group; then it runs examples/ddp_train.py for one short
epoch in the same process group.  It writes ``OUTDIR/rank<r>.json``: a list of
``{"case", "what", "err"}`` (largest absolute difference, scaled by the largest reference value) and
``{"case", "what", "raised"}`` records, which the test asserts on.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import dicetorch as dt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = (2, 3)  # images per rank: unequal on purpose
C = 3
SPATIAL = (6, 7)

LOSSES = {
    "dice": (dt.dice_loss, dt.DiceLoss),
    "generalized": (dt.generalized_dice_loss, dt.GeneralizedDiceLoss),
    "tversky": (dt.tversky_loss, dt.TverskyLoss),
}
CASES = [  # (loss, options, target kind)
    ("dice", {}, "labels"),
    ("dice", {"reduction": "none", "include_background": False}, "labels"),
    ("dice", {"squared": True, "log_loss": True, "reduction": "sum", "class_weights": [0.5, 1.0, 2.0]}, "labels"),
    ("dice", {"ignore_index": 7, "activation": "sigmoid"}, "labels_ignore"),
    ("dice", {"squared": True}, "soft"),
    ("generalized", {}, "labels"),
    ("generalized", {"weighting": "simple", "absent_weight": "zero"}, "labels"),
    ("generalized", {"weighting": "uniform", "include_background": False}, "labels"),
    ("generalized", {"squared": True}, "soft"),  # the volumes travel with the stats
    ("generalized", {"class_weights": [1.0, 2.0, 0.5], "ignore_index": 7}, "labels_ignore"),
    ("tversky", {}, "labels"),
    ("tversky", {"alpha": 0.7, "beta": 0.3, "gamma": 0.75}, "labels"),
    ("tversky", {"alpha": 1.0, "beta": 1.0, "log_loss": True, "include_background": False}, "onehot"),
]


def global_batch(kind: str, seed: int = 0):
    """The whole batch: logits (N, C, H, W) and a target; class 2 only in rank 1's images (absent on
    rank 0: the generalized-Dice weights must come from the global volumes)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(SPLIT)
    x = 2.0 * torch.randn(n, C, *SPATIAL, generator=g, dtype=torch.float64)
    lab = torch.randint(0, C, (n, *SPATIAL), generator=g)
    lab[: SPLIT[0]] = lab[: SPLIT[0]].clamp_max(1)
    if kind == "labels_ignore":
        lab = torch.where(torch.rand(lab.shape, generator=g) < 0.2, torch.full_like(lab, 7), lab)
    if kind == "soft":
        t = torch.rand(n, C, *SPATIAL, generator=g, dtype=torch.float64)
        t = t / t.sum(1, keepdim=True)
    elif kind == "onehot":
        t = nn.functional.one_hot(lab, C).movedim(-1, 1).to(torch.float64)
    else:
        t = lab
    return x, t


def my_slice(rank: int) -> slice:
    start = sum(SPLIT[:rank])
    return slice(start, start + SPLIT[rank])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = max(float(want.abs().max()), 1e-300)
    return float((got - want).abs().max()) / scale


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, C, 1))

    def forward(self, x):
        return self.body(x)


def check_losses(rank: int, world: int, records: list, group=None, tag="", cases=None):
    sl = my_slice(rank)
    for i, (name, opts, kind) in enumerate(CASES):
        if cases is not None and i not in cases:
            continue
        fn, cls = LOSSES[name]
        case = f"{tag}{name}-{i}"
        x, t = global_batch(kind, seed=i)
        # single process on the concatenated batch
        xf = x.clone().requires_grad_()
        want = fn(xf, t, batch=True, **opts)
        want.sum().backward()
        # this rank's slice, global loss
        xs = x[sl].clone().requires_grad_()
        extra = {} if group is None else {"process_group": group}
        got = fn(xs, t[sl], batch=True, distributed=True, **extra, **opts)
        got.sum().backward()
        records.append({"case": case, "what": "value", "err": rel_err(got.detach(), want.detach())})
        # DDP averages over ranks: each rank's input gradient is W times its share
        records.append({"case": case, "what": "input_grad", "err": rel_err(xs.grad / world, xf.grad[sl])})
        # the module form, same value
        mod = cls(batch=True, distributed=True, **extra, **opts)
        records.append({"case": case, "what": "module_value", "err": rel_err(mod(x[sl], t[sl]).detach(), want.detach())})


def check_ddp(rank: int, world: int, records: list):
    """Parameter gradients of a DDP-wrapped model equal single-process training on the whole batch."""
    for name in LOSSES:
        torch.manual_seed(1)
        model = SmallNet().double()
        ref = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        g = torch.Generator().manual_seed(3)
        n = sum(SPLIT)
        images = torch.randn(n, 1, *SPATIAL, generator=g, dtype=torch.float64)
        labels = torch.randint(0, C, (n, *SPATIAL), generator=g)
        fn, cls = LOSSES[name]
        loss_fn = cls(batch=True, distributed=True)
        for step in range(2):  # two SGD steps: the second starts from the updated (shared) weights
            opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
            ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
            sl = my_slice(rank)
            loss = loss_fn(ddp(images[sl]), labels[sl])
            opt.zero_grad()
            loss.backward()
            ref_loss = fn(ref(images), labels, batch=True)
            ref_opt.zero_grad()
            ref_loss.backward()
            records.append({"case": f"ddp-{name}-step{step}", "what": "value",
                            "err": rel_err(loss.detach(), ref_loss.detach())})
            for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
                records.append({"case": f"ddp-{name}-step{step}", "what": f"param_grad:{pname}",
                                "err": rel_err(p.grad, q.grad)})
            opt.step()
            ref_opt.step()


def check_metrics(rank: int, world: int, records: list):
    """dicetorch.metrics synchronize over the ranks (torchmetrics' state sync): each rank updates with its
    slice of logits, compute() equals one process updated with every slice in turn."""
    from dicetorch import metrics as dm

    n = sum(SPLIT)
    g = torch.Generator().manual_seed(5)
    x = 3 * torch.randn(n, C, *SPATIAL, generator=g)
    y = torch.randint(0, C, (n, *SPATIAL), generator=g)
    y[0] = y[0].clamp_max(1)
    y = torch.where(torch.rand(y.shape, generator=g) < 0.2, torch.full_like(y, 9), y)
    for name, make in (("dice", lambda **kw: dm.DiceScore(C, average="none", **kw)),
                       ("dice_global_weighted", lambda **kw: dm.DiceScore(C, average="weighted",
                                                                          aggregation_level="global", **kw)),
                       ("generalized", lambda **kw: dm.GeneralizedDiceScore(C, per_class=True, **kw)),
                       ("iou", lambda **kw: dm.MeanIoU(C, per_class=True, **kw)),
                       ("iou_lazy", lambda **kw: dm.MeanIoU(None, **kw))):
        synced = make(input_format="logits", ignore_index=9)
        synced.update(x[my_slice(rank)], y[my_slice(rank)])
        got = synced.compute()
        alone = make(input_format="logits", ignore_index=9, sync_on_compute=False)
        for r in range(world):
            alone.update(x[my_slice(r)], y[my_slice(r)])
        want = alone.compute()
        err = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
        records.append({"case": f"metric-{name}", "what": "synced_value", "err": err})


def check_refusals(records: list):
    x, t = global_batch("labels")
    for name, (fn, cls) in LOSSES.items():
        for what, call in ((f"{name}-functional", lambda: fn(x, t, distributed=True)),
                           (f"{name}-module", lambda: cls(distributed=True))):
            try:
                call()
                records.append({"case": what, "what": "batch_false", "raised": None})
            except ValueError as e:
                records.append({"case": what, "what": "batch_false", "raised": str(e)})


def main(outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == len(SPLIT), f"run with --nproc_per_node={len(SPLIT)}"
    records: list = []
    try:
        check_losses(rank, world, records)
        # an explicit process group: one case of each loss
        first = {name: i for i, (name, _, _) in reversed(list(enumerate(CASES)))}
        check_losses(rank, world, records, group=dist.new_group(list(range(world))), tag="group-",
                     cases=set(first.values()))
        check_ddp(rank, world, records)
        check_metrics(rank, world, records)
        check_refusals(records)
    except Exception:  # reported to the test, which prints it
        records.append({"case": "worker", "what": "exception", "raised": traceback.format_exc()})
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)
    # the data-parallel example, one short epoch, in the same process group (one launch for all)
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import ddp_train

    ddp_train.main(["--epochs", "1", "--train-size", "96", "--test-size", "37", "--batch-size", "16",
                    "--no-progress", "--threads", "1", "--out", os.path.join(outdir, "example")])
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
