"""DDP on CPU: two gloo processes (torch.multiprocessing.spawn on tcp://127.0.0.1).

1. What DDP promises, checked step by step: after ``backward`` every rank holds the
   MEAN of the two half-batch gradients, and the ranks' parameters stay identical.
   The reference is one process taking the gradient of the mean of the two
   half-batch losses at the same parameters, so no trajectory can amplify float32
   rounding. Plain SGD is used for the whole-run comparison for the same reason
   (Adam divides by sqrt(v): on a weight whose gradient is near zero, 1e-7 of
   float32 noise becomes a step of order lr).
2. The full trainer under DDP (DistributedSampler shards, rank-0 validation and
   checkpoints) keeps the ranks' parameters identical.
"""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from acf_fast.model import ACF
from acf_fast.train import distributed
from acf_fast.train.objective import Objective

WORLD = 2
STEPS = 2
LR = 0.1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(step, B=4, K=5, L=6, Dv=12, Db=10):
    g = torch.Generator().manual_seed(1000 + step)
    n = B * WORLD
    mask = torch.arange(L)[None] < torch.randint(3, L + 1, (n,), generator=g)[:, None]
    pmask = torch.arange(L + 2)[None] < torch.randint(3, L + 3, (n,), generator=g)[:, None]
    return {"regions": torch.randn(n, K, Dv, generator=g), "region_mask": None,
            "globals": torch.randn(n, Dv, generator=g),
            "words": torch.randn(n, L, Db, generator=g) * mask[..., None], "mask": mask,
            "pos_words": torch.randn(n, L + 2, Db, generator=g) * pmask[..., None], "pos_mask": pmask,
            # stand-ins for the cached encodings of the shuffled texts (mixture negatives)
            "shuf_words": torch.randn(n, L, Db, generator=g) * mask[..., None],
            "pos_shuf_words": torch.randn(n, L + 2, Db, generator=g) * pmask[..., None]}


def shard(b, rank, B=4):
    return {k: None if v is None else v[rank * B:(rank + 1) * B] for k, v in b.items()}


def make_objective():
    torch.manual_seed(0)
    model = ACF("paper", embed_dim=8, heads=2, region_dim=12, global_dim=12, text_dim=10)
    return Objective(model, negatives="mixture", positives=True, backend="torch")


def params_vector(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def grads_vector(module):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                      for p in module.parameters()])


def sgd_step(module, lr):
    torch.nn.utils.clip_grad_norm_(module.parameters(), 2.0)
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def _objective_steps(rank, out):
    obj = make_objective()
    ddp = distributed.wrap(obj, distributed.DistInfo(rank, WORLD), torch.device("cpu"))
    record = {"params": [], "grads": []}
    for step in range(STEPS):
        loss, _ = ddp(shard(global_batch(step), rank), torch.Generator().manual_seed(10 * step + rank))
        obj.zero_grad()
        record["params"].append(params_vector(obj).clone())
        loss.backward()
        record["grads"].append(grads_vector(obj).clone())  # DDP's all-reduced mean, before clipping
        sgd_step(obj, LR)
    record["params"].append(params_vector(obj).clone())
    torch.save(record, f"{out}/objective_rank{rank}.pt")


def _trainer_run(rank, data, bert, out):
    from acf_fast.train.config import TrainConfig
    from acf_fast.train.trainer import Trainer

    tr = Trainer(TrainConfig(data=data, out=f"{out}/run", encoder=bert, epochs=1, batch_size=8, embed_dim=16, heads=2,
                             progress=False, backend="torch", seed=1))
    tr.run()
    vec = params_vector(tr.model)
    gathered = [torch.zeros_like(vec) for _ in range(WORLD)]
    dist.all_gather(gathered, vec)
    torch.save({"params": gathered}, f"{out}/trainer_rank{rank}.pt")


def _worker(rank, port, data, bert, out):
    # One spawn for both checks: process start-up is most of this test's time.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        _objective_steps(rank, out)
        _trainer_run(rank, data, bert, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    from test_train_trainer import make_tiny_data

    tmp = tmp_path_factory.mktemp("ddp")
    data, bert = make_tiny_data(tmp / "data", train_images=12, dev_images=4)
    mp.spawn(_worker, args=(free_port(), str(data), bert, str(tmp)), nprocs=WORLD, join=True)
    return tmp


def load_params(module, vec):
    torch.nn.utils.vector_to_parameters(vec.clone(), module.parameters())  # the params become views of it


def mean_loss_backward(obj, step):
    """Single process: backward of the mean of the per-rank losses (same shards and draws); returns the gradient."""
    obj.zero_grad()
    b = global_batch(step)
    losses = [obj(shard(b, r), torch.Generator().manual_seed(10 * step + r))[0] for r in range(WORLD)]
    (sum(losses) / WORLD).backward()
    return grads_vector(obj)


def test_ddp_averages_gradients_and_keeps_ranks_identical(ddp_run):
    ranks = [torch.load(ddp_run / f"objective_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key in ("params", "grads"):
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b), f"ranks disagree on {key}"
    obj = make_objective()
    for step in range(STEPS):
        load_params(obj, ranks[0]["params"][step])
        want = mean_loss_backward(obj, step)
        got = ranks[0]["grads"][step]
        # The two sides sum the same float32 terms in different orders (gloo's
        # all-reduce of two half-batch gradients vs one autograd pass; 1 thread vs
        # several), a few ulps of the largest terms each (1 ulp measured): 1e-5 of
        # the gradient's scale is ~100 ulps. A wrong average (one rank's loss scaled
        # by 2) moves the gradient by half a rank's gradient, O(1) of its scale.
        scale = want.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"step {step}: {m}")
    # Whole run with plain SGD: the same steps as the single process.
    load_params(obj, ranks[0]["params"][0])
    for step in range(STEPS):
        mean_loss_backward(obj, step)
        sgd_step(obj, LR)
    single = params_vector(obj)
    assert not torch.allclose(single, ranks[0]["params"][0])  # the steps did move the weights
    # SGD moves each weight by LR × a clipped gradient: the gradients' float32 noise
    # (above) reaches the weights scaled by LR, with no 1/sqrt(v) amplification.
    torch.testing.assert_close(ranks[0]["params"][-1], single, rtol=1e-5, atol=1e-6)


def test_ddp_trainer_ranks_stay_in_sync(ddp_run):
    got = torch.load(ddp_run / "trainer_rank0.pt", weights_only=True)["params"]
    assert torch.equal(got[0], got[1])
    assert (ddp_run / "run" / "best.safetensors").is_file()
    lines = (ddp_run / "run" / "log.jsonl").read_text().splitlines()
    assert any('"event": "epoch"' in x for x in lines)
