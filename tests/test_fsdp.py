"""DecaySGD under FSDP2 (``torch.distributed.fsdp.fully_shard``), whose parameters are DTensors.

Two processes on gloo, on the CPU, run this file as a script (one run for the whole module: the
start-up of two torch processes is most of its cost). Each rank builds the same small MLP, shards
it with ``fully_shard`` (uneven shards, and one rank holding an empty shard of the last weight)
and steps it with DecaySGD and, from the same init, with ``torch.optim.SGD``. The tests below
read what each rank measured:

* stepping the local shards is stepping the whole: each kernel backend's sharded step equals its
  step of unsharded copies given the gathered grads, bit for bit (the step is elementwise and
  every element takes the same path). The torch backend on the CPU is torch's fused kernel
  (``torch._fused_sgd_``), whose vectorised body and scalar tail round differently, so where a
  shard boundary moves elements between the two it agrees to ROUNDING, not bitwise;
* against torch SGD on the same sharded model, every backend agrees to ROUNDING (a few fp32 ulps
  of the params, ~0.5 here, after STEPS steps: the kernels' and the fused kernel's own rounding);
* the momentum buffers are DTensors placed like their params, as torch SGD's are;
* optimizer state dicts move both ways between DecaySGD and torch SGD through
  ``torch.distributed.checkpoint.state_dict`` (sharded and full), and stepping on from the loaded
  state matches the optimizer that saved it (the loaded state bit for bit, the steps after it to
  ROUNDING);
* factored mode under FSDP2, and with a DDP built before the optimizer, raises an error that
  names the limit (factored mode under DDP itself: tests/test_distributed_factored.py).

``torch.optim.SGD(fused=True)`` is not a reference here: torch has no DTensor sharding strategy
for ``aten._fused_sgd_`` (NotImplementedError at the first step, torch 2.13); its for-loop and
foreach paths are.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import error_of, join_ranks, run_ranks

WORLD_SIZE = 2
STEPS = 4
CHILD_TIMEOUT_S = 120
CONFIGS = {
    "momentum-dampening-wd": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov-maximize": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                              maximize=True),
    "plain-wd": dict(lr=0.05, weight_decay=0.01),
}
# The torch backend steps every config; the kernel backends (interpreted on the CPU: seconds per
# launch) this one, which has the momentum buffer's first-step and later rules.
KERNEL_CONFIG = "momentum-dampening-wd"


# ----------------------------------------------------------------------------------------------
# The worker: one rank of the two-process run (this file run as a script).
# ----------------------------------------------------------------------------------------------
def _sharded_model(mesh):
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # every rank and every call: the same full init, then sharded
    # Rows 9, 5, 1 over 2 ranks: shards of 5/4 and 3/2 rows, and an empty one (1/0) on rank 1.
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(1000 * rank + step))


def _train(model, opt, rank: int, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        model(_batch(rank, step)).square().mean().backward()
        opt.step()


def _train_beside_whole_copy(model, opt, make_opt, rank: int) -> dict:
    """Step ``model`` (sharded) with ``opt`` and, beside it, unsharded copies of its params with
    ``make_opt(copies)``, given the gathered grads: the step of the shards against the step of
    the whole (the same backend), params and momentum buffers compared after STEPS steps."""
    whole = [torch.nn.Parameter(p.detach().full_tensor()) for p in model.parameters()]
    whole_opt = make_opt(whole)
    for step in range(STEPS):
        opt.zero_grad()
        model(_batch(rank, step)).square().mean().backward()
        for p, w in zip(model.parameters(), whole):
            w.grad = p.grad.full_tensor()
        opt.step()
        whole_opt.step()
    exact, worst = True, 0.0
    for p, w in zip(model.parameters(), whole):
        pairs = [(p.detach().full_tensor(), w.detach())]
        if "momentum_buffer" in whole_opt.state[w]:
            pairs.append((opt.state[p]["momentum_buffer"].full_tensor(),
                          whole_opt.state[w]["momentum_buffer"]))
        for a, b in pairs:
            exact &= torch.equal(a, b)
            worst = max(worst, (a.double() - b.double()).abs().max().item())
    return {"exact": exact, "max_abs_diff": worst}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of one backend against another (ROUNDING, defined below)."""
    return a.shape == b.shape and (a.numel() == 0 or
                                   (a.double() - b.double()).abs().max().item() <= ROUNDING)


def _compare(model_a, model_b) -> dict:
    """Exact equality and the largest difference of the local shards of two models' params."""
    exact, worst = True, 0.0
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        la, lb = a.to_local(), b.to_local()
        exact &= torch.equal(la, lb)
        if la.numel():
            worst = max(worst, (la.double() - lb.double()).abs().max().item())
    return {"exact": exact, "max_abs_diff": worst}


def _placement_problems(model, opt) -> list[str]:
    """How params and momentum buffers fail to be DTensors placed like torch SGD's (none: [])."""
    from torch.distributed.tensor import DTensor

    problems = []
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            problems.append(f"{name}: param is {type(p).__name__}, not a DTensor")
            continue
        buf = opt.state[p].get("momentum_buffer")
        if buf is None:
            continue
        if not isinstance(buf, DTensor):
            problems.append(f"{name}: momentum buffer is {type(buf).__name__}, not a DTensor")
        elif (buf.placements, buf.device_mesh, buf.shape, buf.to_local().shape) != \
                (p.placements, p.device_mesh, p.shape, p.to_local().shape):
            problems.append(f"{name}: buffer {buf.placements} {tuple(buf.to_local().shape)} vs "
                            f"param {p.placements} {tuple(p.to_local().shape)}")
    return problems




def _step_results(mesh, rank: int, backends: list[str]) -> dict:
    from lowrank_kernels import DecaySGD

    results = {}
    for config_name, config in CONFIGS.items():
        references = {}
        for foreach in (False, True):
            model = _sharded_model(mesh)
            _train(model, torch.optim.SGD(model.parameters(), foreach=foreach, **config), rank,
                   range(STEPS))
            references[f"torch-foreach={foreach}"] = model
        for backend in backends if config_name == KERNEL_CONFIG else ["torch"]:
            model = _sharded_model(mesh)
            opt = DecaySGD(model.parameters(), backend=backend, **config)
            results[f"{config_name}/{backend}/vs/whole"] = _train_beside_whole_copy(
                model, opt, lambda params: DecaySGD(params, backend=backend, **config), rank)
            for ref_name, ref in references.items():
                results[f"{config_name}/{backend}/vs/{ref_name}"] = _compare(model, ref)
            results[f"{config_name}/{backend}/placement"] = _placement_problems(model, opt)
    return results


def _state_dict_results(mesh, rank: int) -> dict:
    """Save after STEPS steps from one optimizer, load into the other (a fresh one on a copy of
    the model), step both on: the continuations must agree exactly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from lowrank_kernels import DecaySGD

    config = CONFIGS["momentum-dampening-wd"]
    makers = {"DecaySGD": lambda params: DecaySGD(params, **config),
              "torch.optim.SGD": lambda params: torch.optim.SGD(params, **config)}
    results = {}
    for full in (False, True):
        options = StateDictOptions(full_state_dict=full)
        kind = "full" if full else "sharded"
        for source, target in (("DecaySGD", "torch.optim.SGD"), ("torch.optim.SGD", "DecaySGD")):
            key = f"{kind}/{source}->{target}"
            results[f"{key}/error"] = error_of(lambda: _move_state(
                results, key, mesh, rank, options, makers[source], makers[target]))
        # The two optimizers' own state dicts after the same steps: same entries, same values.
        dicts = {}
        for name, make in makers.items():
            model = _sharded_model(mesh)
            opt = make(model.parameters())
            _train(model, opt, rank, range(STEPS))
            dicts[name] = get_optimizer_state_dict(model, opt, options=options)
        results[f"{kind}/state-dict-difference"] = _state_dict_difference(
            dicts["DecaySGD"], dicts["torch.optim.SGD"])
    return results


def _move_state(results, key, mesh, rank, options, make_source, make_target) -> None:
    """Save model and optimizer state after STEPS steps of ``make_source``'s optimizer, load it
    into a fresh model and ``make_target``'s optimizer, step both on."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    saved_model = _sharded_model(mesh)
    saved_opt = make_source(saved_model.parameters())
    _train(saved_model, saved_opt, rank, range(STEPS))
    model_sd = get_model_state_dict(saved_model, options=options)
    # A copy, as a checkpoint holds: a sharded state dict shares the optimizer's buffers.
    optim_sd = copy.deepcopy(get_optimizer_state_dict(saved_model, saved_opt, options=options))
    loaded_model = _sharded_model(mesh)
    loaded_opt = make_target(loaded_model.parameters())
    set_model_state_dict(loaded_model, model_sd, options=options)
    set_optimizer_state_dict(loaded_model, loaded_opt, optim_sd, options=options)
    results[f"{key}/loaded"] = _compare(saved_model, loaded_model)
    results[f"{key}/placement"] = _placement_problems(loaded_model, loaded_opt)
    _train(saved_model, saved_opt, rank, range(STEPS, STEPS + 2))
    _train(loaded_model, loaded_opt, rank, range(STEPS, STEPS + 2))
    results[f"{key}/continued"] = _compare(saved_model, loaded_model)


def _state_dict_difference(ours: dict, theirs: dict) -> list[str]:
    """What differs between DecaySGD's and torch SGD's state dicts, besides the extra group
    options DecaySGD keeps (torch SGD ignores them when loading)."""
    from torch.distributed.tensor import DTensor

    problems = []
    if ours["state"].keys() != theirs["state"].keys():
        problems.append(f"state keys {sorted(ours['state'])} vs {sorted(theirs['state'])}")
    for key in ours["state"].keys() & theirs["state"].keys():
        a, b = ours["state"][key], theirs["state"][key]
        if a.keys() != b.keys():
            problems.append(f"{key}: entries {sorted(a)} vs {sorted(b)}")
            continue
        for entry in a:
            x, y = a[entry], b[entry]
            if type(x) is not type(y):
                problems.append(f"{key}.{entry}: {type(x).__name__} vs {type(y).__name__}")
            elif isinstance(x, DTensor):
                if x.placements != y.placements or not _close(x.to_local(), y.to_local()):
                    problems.append(f"{key}.{entry}: local shards or placements differ")
            elif isinstance(x, torch.Tensor) and not _close(x, y):
                problems.append(f"{key}.{entry}: values differ")
    for i, (g, h) in enumerate(zip(ours["param_groups"], theirs["param_groups"])):
        shared = {k: (g[k], h[k]) for k in h if k in g and g[k] != h[k]}
        if shared or h.keys() - g.keys():
            problems.append(f"group {i}: differing {shared}, missing {sorted(h.keys() - g.keys())}")
    return problems


def _factored_results(mesh, rank: int) -> dict:
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from lowrank_kernels import DecaySGD

    sharded = _sharded_model(mesh)
    results = {"fsdp2": error_of(lambda: DecaySGD(sharded.parameters(), lr=0.1, factored=True,
                                                   model=sharded))}
    torch.manual_seed(0)
    ddp = DistributedDataParallel(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)))
    opt = DecaySGD(ddp.parameters(), lr=0.1, momentum=0.9, factored=True, model=ddp)
    ddp(_batch(rank, 0)).square().mean().backward()
    results["ddp"] = error_of(opt.step)
    return results


def _worker(rank: int, store_port: int, out_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lowrank_kernels.backends import available_backends

    join_ranks(rank, WORLD_SIZE, store_port)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        backends = available_backends("cpu")
        results = {"backends": backends, "seconds": {}}
        sections = {"step": lambda: _step_results(mesh, rank, backends),
                    "state_dict": lambda: _state_dict_results(mesh, rank),
                    "factored": lambda: _factored_results(mesh, rank)}
        for name, run in sections.items():  # timed, to show where a slow run spends its time
            start = time.perf_counter()
            results[name] = run()
            results["seconds"][name] = round(time.perf_counter() - start, 2)
    finally:
        dist.destroy_process_group()
    Path(out_path).write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------------------------
# The tests: run the two ranks once, read what they measured.
# ----------------------------------------------------------------------------------------------
pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    fsdp = pytest.importorskip("torch.distributed.fsdp", reason="needs torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
    out = tmp_path_factory.mktemp("fsdp")
    run_ranks(__file__, WORLD_SIZE, lambda rank, port: [rank, port, out / f"rank{rank}.json"],
              CHILD_TIMEOUT_S, label="FSDP2 ranks")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]



def _runs(result: dict) -> int:
    """How many (config, backend) runs a rank stepped."""
    return len(CONFIGS) - 1 + len(result["backends"])


# A few fp32 ulps of params around 0.5 (the rounding of one backend against another).
ROUNDING = 4 * 2.0 ** -24


def _entries(result: dict, section: str, suffix: str) -> dict:
    return {k: v for k, v in result[section].items() if k.endswith(suffix)}


def _not_exact(entries: dict) -> dict:
    return {k: v for k, v in entries.items() if not v["exact"]}


def _far(entries: dict) -> dict:
    return {k: v for k, v in entries.items() if v["max_abs_diff"] > ROUNDING}


def test_cpu_backends_include_a_kernel_launch(ranks):
    # The kernel backends read raw pointers: they can run only on the DTensors' local shards.
    assert ranks[0]["backends"][0] == "torch"
    if ranks[0]["backends"] == ["torch"]:
        pytest.skip("no kernel backend runs on the CPU here (the triton one needs "
                    "TRITON_INTERPRET=1, which tests/conftest.py sets without a GPU)")


def test_stepping_the_shards_is_stepping_the_whole(ranks):
    # Every backend, sharded against unsharded with the gathered grads: the step is elementwise.
    for rank, result in enumerate(ranks):
        compared = _entries(result, "step", "/vs/whole")
        assert len(compared) == _runs(result)
        kernels = {k: v for k, v in compared.items() if k.split("/")[1] != "torch"}
        assert not _not_exact(kernels), f"rank {rank}: {_not_exact(kernels)}"
        assert not _far(compared), f"rank {rank}: {_far(compared)}"


@pytest.mark.parametrize("reference", ["torch-foreach=False", "torch-foreach=True"])
def test_steps_on_fsdp2_shards_match_torch_sgd(ranks, reference):
    for rank, result in enumerate(ranks):
        compared = _entries(result, "step", f"/vs/{reference}")
        assert len(compared) == _runs(result)
        assert not _far(compared), f"rank {rank}: {_far(compared)}"


def test_momentum_buffers_are_dtensors_placed_like_their_params(ranks):
    for rank, result in enumerate(ranks):
        problems = {k: v for k, v in _entries(result, "step", "/placement").items() if v}
        assert len(_entries(result, "step", "/placement")) == _runs(result)
        assert not problems, f"rank {rank}: {problems}"


@pytest.mark.parametrize("kind", ["sharded", "full"])
@pytest.mark.parametrize("direction", ["DecaySGD->torch.optim.SGD", "torch.optim.SGD->DecaySGD"])
def test_distributed_state_dict_moves_between_decay_sgd_and_torch_sgd(ranks, kind, direction):
    for rank, result in enumerate(ranks):
        prefix = f"{kind}/{direction}/"
        entries = {k[len(prefix):]: v for k, v in result["state_dict"].items()
                   if k.startswith(prefix)}
        assert entries["error"] is None, f"rank {rank}: {entries['error']}"
        assert entries.keys() == {"error", "loaded", "continued", "placement"}
        assert entries["loaded"]["exact"], f"rank {rank}: {entries}"
        assert entries["continued"]["max_abs_diff"] <= ROUNDING, f"rank {rank}: {entries}"
        assert not entries["placement"], f"rank {rank}: {entries['placement']}"


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_distributed_state_dicts_of_decay_sgd_and_torch_sgd_agree(ranks, kind):
    for rank, result in enumerate(ranks):
        problems = result["state_dict"][f"{kind}/state-dict-difference"]
        assert not problems, f"rank {rank}: {problems}"


def test_factored_mode_under_fsdp2_names_the_limit(ranks):
    for result in ranks:
        error = result["factored"]["fsdp2"]
        assert error is not None, "DecaySGD(factored=True) accepted FSDP2-sharded weights"
        assert error.startswith("NotImplementedError") and "DTensor" in error \
            and "FSDP2" in error and "factored=False" in error, error


def test_factored_mode_with_ddp_built_first_names_the_limit(ranks):
    for result in ranks:
        error = result["factored"]["ddp"]
        assert error is not None, "DecaySGD(factored=True) stepped a model DDP already reduces"
        assert error.startswith("RuntimeError") and "data parallelism" in error \
            and "after building DecaySGD" in error, error


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
