"""The torchtitan adapter (mythos/titan.py) against the project's own twin, with torchtitan 0.3.0's own pieces.

Run in the titan venv (tests/titan/install.sh):  /tmp/tt/bin/python -m pytest -m titan tests/titan -q

What of torchtitan runs here: ModelSpec, BaseModel.Config.build (under torch.device("meta"), as its trainer
builds), to_empty + init_weights (its trainer's order), ParallelDims, its StateDictAdapter base and DCP's
HuggingFaceStorageReader/Writer (the checkpointer's HF path), OptimizersContainer (built from its Config),
LRSchedulersContainer, BaseLoss.__call__ and CrossEntropyLoss, dist_utils.clip_grad_norm_, the optimizer's
step hooks, Trainer.Config (trainer_config) built part by part. Its Trainer is not run: on a host without
CUDA its device selection falls back to "cuda" and its memory monitor needs a device.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

import mythos_torch as mt
import spec as spec_lib
import weights_bridge as wb
from mythos import titan
from sharded.ranks import run_ranks
from spec.training import TrainConfig, lr_factor

pytestmark = pytest.mark.titan

SPEC = spec_lib.dump(spec_lib.preset("tiny"))  # YAML text: the Config's spec field takes text, paths and presets
E = 4  # the tiny preset's routed experts
RNG = np.random.default_rng(1)
IDS = RNG.integers(0, 64, (4, 8))  # the training batch: 2 rows per rank
LABELS = np.roll(IDS, -1, axis=1)
EVAL = IDS[[0, 2]]  # one row per rank; the unsharded loop halts row 0 at step 3 and row 1 at step 2
STEPS = 3
CFG = TrainConfig(steps=10, warmup_steps=2, lr=3e-3, grad_clip=0.5, seed=0, dtype="float64")  # clipping active


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _build(**kw: object) -> titan.MythosModel:
    """A MythosModel as torchtitan's trainer builds it: under torch.device("meta") (_materialise fills it)."""
    kw = {"dtype": "float64", **kw}
    ms = titan.model_spec(SPEC, **kw)
    with torch.device("meta"):
        model = ms.model.build()
    return model


def _materialise(model: titan.MythosModel) -> titan.MythosModel:
    """What torchtitan's trainer does after parallelize_fn: to_empty on the host, then init_weights."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


def _tensors(m: mt.Mythos) -> dict[str, torch.Tensor]:
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


def _pieces(model: titan.MythosModel, cfg: TrainConfig, loss: str = "mythos") -> tuple[object, object, object]:
    """torchtitan's optimizer container (its Config built, the router-bias hook registered), its LR scheduler
    container and loss, made as its Trainer makes them: after parallelize_fn and init_weights, before any step."""
    from torchtitan.components.loss import CrossEntropyLoss

    optimizers = titan.optimizer_config(SPEC, cfg).build(model_parts=[model])
    titan.register_router_bias_hook(optimizers, [model])
    schedulers = titan.MythosLRSchedule.Config(warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio).build(
        optimizers=optimizers, training_steps=cfg.steps)
    loss_fn = (titan.MythosLoss.Config() if loss == "mythos" else CrossEntropyLoss.Config()).build()
    return optimizers, schedulers, loss_fn


def _train(model: titan.MythosModel, pieces: tuple[object, object, object], ids: np.ndarray, labels: np.ndarray,
           cfg: TrainConfig, global_tokens: int) -> list[float]:
    """STEPS steps of torchtitan's Trainer.train_step, piece by piece: zero_grad, model(inputs), its loss over
    the global token count, backward, dist_utils.clip_grad_norm_, optimizers.step (the router-bias hook),
    lr_schedulers.step. Returns the losses."""
    from torchtitan.distributed import utils as dist_utils

    optimizers, schedulers, loss_fn = pieces
    model.train()
    losses = []
    for _ in range(STEPS):
        optimizers.zero_grad()
        out, _ = loss_fn(model(torch.as_tensor(ids)), torch.as_tensor(labels), torch.tensor(global_tokens))
        out.backward()
        if cfg.grad_clip > 0:
            dist_utils.clip_grad_norm_(list(model.parameters()), cfg.grad_clip, foreach=True)
        optimizers.step()
        schedulers.step()
        losses.append(float(out.detach()))
    return losses


def _adam_state(model: titan.MythosModel, optimizers: object) -> dict[str, np.ndarray]:
    """exp_avg/<path>, exp_avg_sq/<path> of every parameter, whole (a collective on sharded ones, path order)."""
    named = {id(p): n.removeprefix(titan.PREFIX) for n, p in model.named_parameters()}
    found = {}
    for opt in optimizers.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                found[named[id(p)]] = opt.state[p]
    out = {}
    for path in sorted(found):
        for kind in ("exp_avg", "exp_avg_sq"):
            t = mt.sharding.full_tensor(model.model.sharding, path, found[path][kind].detach())
            out[f"{kind}/{path}"] = t.numpy().copy()
    return out


def _weights(model: titan.MythosModel) -> dict[str, np.ndarray]:
    """Every parameter and buffer of the twin, whole (a collective on sharded ones, path order)."""
    sh = model.model.sharding
    return {k: mt.sharding.full_tensor(sh, k, v.detach()).numpy().copy()
            for k, v in sorted(model.model.state_dict().items())}


# --------------------------------------------------------------------------- one process


def test_model_spec_builds_what_torchtitan_asks_for():
    ms = titan.model_spec("tiny")
    assert (ms.name, ms.flavor, ms.pipelining_fn) == ("mythos", "tiny", None)
    assert ms.parallelize_fn is titan.parallelize_mythos
    assert ms.post_optimizer_build_fn is titan.register_router_bias_hook
    assert ms.state_dict_adapter is titan.MythosStateDictAdapter
    assert titan.model_spec(SPEC).flavor == "custom"
    model = ms.model.build()  # the Configurable's build: MythosModel(config=...)
    assert isinstance(model, titan.MythosModel) and isinstance(model.model, mt.Mythos)
    model.verify_module_protocol()
    s = spec_lib.preset("tiny")
    nparams, flops = ms.model.get_nparams_and_flops(model, 16)
    assert nparams == spec_lib.count_params(s)["total"] == sum(p.numel() for p in model.parameters())
    assert flops == int(3 * spec_lib.flops_per_token(s, 16)["total"])


def test_config_errors_name_the_field():
    from torchtitan.config import ParallelismConfig, TrainingConfig

    class Job:  # what update_from_config reads of torchtitan's Trainer.Config
        training = TrainingConfig(seq_len=spec_lib.preset("tiny").max_seq_len + 1)
        parallelism = ParallelismConfig()

    cfg = titan.MythosModel.Config(spec="tiny")
    with pytest.raises(ValueError, match=r"training.seq_len=\d+ exceeds the spec's max_seq_len"):
        cfg.update_from_config(config=Job())
    Job.training = TrainingConfig(seq_len=8)
    Job.parallelism = ParallelismConfig(pipeline_parallel_degree=2)
    with pytest.raises(ValueError, match="pipeline_parallel_degree=2"):
        cfg.update_from_config(config=Job())
    Job.parallelism = ParallelismConfig()
    cfg.update_from_config(config=Job())
    ponder = titan.MythosModel.Config(spec=spec_lib.dump(spec_lib.preset("tiny", {"loss.ponder": 0.01})))
    with pytest.raises(ValueError, match="spec loss ponder=0.01: torchtitan's loss is the cross-entropy"):
        ponder.update_from_config(config=Job())
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        titan.MythosModel.Config(dtype="float16").build()
    with pytest.raises(ValueError, match="n_loops=0"):
        titan.MythosModel.Config(n_loops=0).build()
    with pytest.raises(spec_lib.SpecError, match="no-such-preset.* is neither a preset"):
        titan.model_spec("no-such-preset")
    with pytest.raises(ValueError, match="positions is not supported"):
        titan.MythosModel.Config().build()(torch.zeros(1, 4, dtype=torch.long), positions=torch.zeros(1, 4))


def test_logits_and_init_equal_the_twins_build():
    ref = mt.build(spec_lib.preset("tiny"), seed=0, dtype="float64")
    eager = titan.MythosModel.Config(spec="tiny", dtype="float64").build()  # off the meta device: built at once
    model = _build()
    assert model.model.embed.weight.is_meta
    _materialise(model)
    want = _tensors(ref)
    for m in (eager, model):
        got = _tensors(m.model)
        assert list(got) == list(want)  # parameters and buffers, the RoPE tables and the router bias included
        for k in want:
            assert torch.equal(got[k], want[k]), k
        m.eval()
        with torch.no_grad():
            assert torch.equal(m(torch.as_tensor(EVAL)), ref(torch.as_tensor(EVAL)).logits)
            assert torch.equal(m.loop_counts, ref(torch.as_tensor(EVAL)).loop_counts)
    other = _materialise(_build(seed=1))
    assert not torch.equal(other.model.embed.weight, ref.embed.weight)
    two = titan.MythosModel.Config(spec="tiny", dtype="float64", n_loops=2).build().eval()
    with torch.no_grad():
        assert torch.equal(two(torch.as_tensor(EVAL)), ref(torch.as_tensor(EVAL), 2).logits)


def test_init_from_a_weights_file(tmp_path):
    src = mt.build(spec_lib.preset("tiny"), seed=5, dtype="float64")
    path = wb.save(src, tmp_path / "m.safetensors")
    model = _materialise(_build(weights=str(path)))
    for k, v in _tensors(src).items():
        assert torch.equal(_tensors(model.model)[k], v), k
    wrong = titan.model_spec(spec_lib.dump(spec_lib.preset("tiny", {"dim": 48})), dtype="float64", weights=str(path))
    with pytest.raises(ValueError, match="holds a model of another spec"):
        wrong.model.build()


def test_state_dict_adapter_round_trips_the_project_file(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    src = mt.build(spec_lib.preset("tiny"), seed=3, dtype="float64")
    (tmp_path / "assets").mkdir()
    first = wb.save(src, tmp_path / "assets" / "model.safetensors")
    model = _materialise(_build())
    adapter = titan.MythosStateDictAdapter(model_spec_config(), str(tmp_path / "assets"))
    # torchtitan's checkpointer with initial_load_in_hf: to_hf, its HF storage reader, from_hf, load_state_dict
    hf = adapter.to_hf(model.state_dict())
    dcp.load(hf, storage_reader=adapter.get_hf_storage_reader(str(tmp_path / "assets")))
    model.load_state_dict(adapter.from_hf(hf))
    for k, v in src.state_dict().items():
        assert torch.equal(model.model.state_dict()[k], v), k
    # and back: the torchtitan state dict as the project's file, byte for byte
    second = titan.save_state_dict(model.state_dict(), SPEC, tmp_path / "second.safetensors")
    assert second.read_bytes() == first.read_bytes()
    s, sd = titan.load_state_dict(first)
    assert s == spec_lib.preset("tiny") and sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    # torchtitan's last_save_in_hf export (DCP's HuggingFaceStorageWriter) -> the project's file, byte for byte
    dcp.save(adapter.to_hf(model.state_dict()),
             storage_writer=HuggingFaceStorageWriter(path=str(tmp_path / "hf"), save_distributed=True,
                                                     enable_consolidation=True))
    third = titan.from_hf_checkpoint(tmp_path / "hf", SPEC, tmp_path / "third.safetensors")
    assert third.read_bytes() == first.read_bytes()
    assert wb.load(third, backend="torch").spec == spec_lib.preset("tiny")


def model_spec_config() -> titan.MythosModel.Config:
    return titan.model_spec(SPEC, dtype="float64").model


def test_state_dict_adapter_names_every_problem():
    adapter = titan.MythosStateDictAdapter(model_spec_config(), None)
    sd = _materialise(_build()).state_dict()
    bad = dict(sd)
    bad["model.extra.weight"] = torch.zeros(1)
    del bad["model.norm.weight"]
    bad["model.embed.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="3 problem") as e:
        adapter.to_hf(bad)
    msg = str(e.value)
    assert "unexpected key 'model.extra.weight'" in msg and "missing key 'model.norm.weight'" in msg
    assert "model.embed.weight: shape (3, 3)" in msg
    with pytest.raises(ValueError, match="missing key 'norm.weight'"):
        hf = adapter.to_hf(sd)
        del hf["norm.weight"]
        adapter.from_hf(hf)


def test_torchtitan_training_pieces_equal_the_project_trainer():
    """3 steps of torchtitan's optimizer container, schedule, loss, clipping and step hook on the MythosModel
    equal mythos_torch.Trainer's train_step (float64): weights, Adam moments, router bias, losses."""
    s = spec_lib.preset("tiny")
    tr = mt.Trainer(mt.build(s, seed=0, dtype="float64"), CFG)
    want_losses, norms = [], []
    for _ in range(STEPS):
        r = mt.train_step(tr, IDS, LABELS, np.ones_like(IDS, dtype=bool), s.recurrent.max_loop_iters)
        want_losses.append(r.loss)
        norms.append(r.grad_norm)
    assert min(norms) > CFG.grad_clip  # the clipping is active in every step
    model = _materialise(_build())
    pieces = _pieces(model, CFG)
    losses = _train(model, pieces, IDS, LABELS, CFG, IDS.size)
    optimizers = pieces[0]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-12)
    bias = model.model.recurrent.block.ffn.router_bias
    assert bias.abs().sum() > 0  # the hook moved it
    for k, v in tr.model.state_dict().items():
        assert _rel(model.model.state_dict()[k], v) < 1e-12, k
    want = mt.optimizer_arrays(tr)
    for k, v in _adam_state(model, optimizers).items():
        assert _rel(v, want[k]) < 1e-12, k
    assert torch.equal(bias, tr.model.recurrent.block.ffn.router_bias)


def test_trainer_config_is_what_torchtitans_trainer_builds_from():
    """trainer_config's Trainer.Config, its parts built the way Trainer.__init__ builds them, gives the pieces the
    test above checks against mythos_torch.Trainer."""
    from torchtitan.trainer import Trainer

    cfg = titan.trainer_config(SPEC, CFG, seq_len=8, local_batch_size=2)
    assert isinstance(cfg, Trainer.Config) and cfg.model_spec.name == "mythos"
    assert (cfg.training.seq_len, cfg.training.steps, cfg.training.max_norm) == (8, CFG.steps, CFG.grad_clip)
    assert cfg.activation_checkpoint is None
    cfg.model_spec.model.update_from_config(config=cfg)
    model = _materialise(_build())
    optimizers = cfg.optimizer.build(model_parts=[model])
    groups = [g for opt in optimizers.optimizers for g in opt.param_groups]
    assert [g["weight_decay"] for g in groups] == [CFG.weight_decay, 0.0]
    assert {n for g in groups for n in g["param_names"]} == {n for n, _ in model.named_parameters()}
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])
    schedulers = cfg.lr_scheduler.build(optimizers=optimizers, training_steps=cfg.training.steps)
    lrs = []
    for _ in range(4):
        lrs.append(schedulers.schedulers[0].get_last_lr()[0])
        optimizers.step()
        schedulers.step()
    np.testing.assert_allclose(lrs, [CFG.lr * lr_factor(CFG, s) for s in range(4)], rtol=1e-15)
    assert isinstance(cfg.loss.build(compile_config=cfg.compile), titan.MythosLoss)


def test_mesh_for_maps_torchtitan_degrees():
    from torchtitan.distributed.parallel_dims import ParallelDims

    def pd(**kw: int) -> ParallelDims:
        d = dict(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1)
        d.update(kw)
        return ParallelDims(**d, world_size=d["dp_replicate"] * d["dp_shard"] * d["cp"] * d["tp"] * d["pp"])

    assert titan.mesh_for(pd()) == ({}, "")
    assert titan.mesh_for(pd(dp_shard=2)) == ({"data": 2}, "fsdp")
    assert titan.mesh_for(pd(dp_replicate=2)) == ({"data": 2}, "dp")
    assert titan.mesh_for(pd(tp=2)) == ({"model": 2}, "tp")
    assert titan.mesh_for(pd(dp_shard=4, ep=2, tp=2)) == ({"data": 2, "expert": 2, "model": 2}, "fsdp+ep+tp")
    assert titan.mesh_for(pd(dp_shard=2, ep=2)) == ({"expert": 2}, "ep")
    with pytest.raises(ValueError, match="HSDP"):
        titan.mesh_for(pd(dp_replicate=2, dp_shard=2))
    with pytest.raises(ValueError, match="context_parallel_degree=2"):
        titan.mesh_for(pd(cp=2))
    with pytest.raises(ValueError, match="expert_parallel_degree=4 must divide the data-parallel degree 2"):
        titan.mesh_for(pd(dp_shard=2, ep=4))


# --------------------------------------------------------------------------- gloo ranks

@dataclasses.dataclass(frozen=True)
class Scenario:
    degrees: dict  # torchtitan's ParallelDims on 2 ranks
    strategy: tuple[str, ...]  # what parallelize_mythos makes of them
    mesh: dict
    dtype: str = "float64"
    loss: str = "mythos"  # MythosLoss, or "titan": torchtitan's CrossEntropyLoss (float32 logits)
    clip: bool = True  # torchtitan's dist_utils.clip_grad_norm_ (it refuses tp's and ep's parameter mix)
    tol: float = 1e-12  # logits and weights, relative

    @property
    def batch(self) -> bool:
        return "tp" not in self.strategy  # tp alone: every rank runs the whole batch


SCENARIOS = {
    "fsdp": Scenario(dict(dp_shard=2), ("fsdp",), {"data": 2}),
    "dp": Scenario(dict(dp_replicate=2), ("dp",), {"data": 2}),
    "tp": Scenario(dict(dp_shard=1, tp=2), ("tp",), {"model": 2}, clip=False),
    "ep": Scenario(dict(dp_shard=2, ep=2), ("ep",), {"expert": 2}, clip=False),
    "fsdp-float32": Scenario(dict(dp_shard=2), ("fsdp",), {"data": 2}, dtype="float32", loss="titan", tol=1e-5),
}


SKEWED = (np.array([5, 0, 0, 0]), np.array([0, 0, 0, 9]))  # expert loads of rank 0 and 1: the batch's is their sum


def _cfg(name: str) -> TrainConfig:
    sc = SCENARIOS[name]
    return dataclasses.replace(CFG, dtype=sc.dtype, grad_clip=CFG.grad_clip if sc.clip else 0.0)


def _scenario(rank: int, world: int, name: str, tmp: str) -> dict[str, object]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed.parallel_dims import ParallelDims

    sc = SCENARIOS[name]
    degrees = dict(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1)
    degrees.update(sc.degrees)
    pd = ParallelDims(**degrees, world_size=world)
    ms = titan.model_spec(SPEC, dtype=sc.dtype)
    with torch.device("meta"):  # as torchtitan's trainer: build on meta, parallelize, to_empty, init_weights
        model = ms.model.build()
    model = ms.parallelize_fn(model, parallel_dims=pd, training=None, parallelism=None, compile_config=None,
                              ac_config=None, dump_folder="")
    _materialise(model)
    sh = model.model.sharding
    out: dict[str, object] = {"strategy": sh.strategy, "mesh": dict(zip(sh.mesh.mesh_dim_names, sh.mesh.shape))}
    out["dtensors"] = sum(isinstance(p, DTensor) for p in model.parameters())
    out["experts"] = tuple(model.model.recurrent.block.ffn.experts.gate.shape)
    folder = f"{tmp}/{name}"
    os.makedirs(folder, exist_ok=True)
    out["init_file"] = str(titan.save_weights(model, f"{folder}/model.safetensors"))  # every rank; rank 0 writes
    cfg = _cfg(name)
    pieces = _pieces(model, cfg, sc.loss)
    model.eval()
    rows = slice(rank, rank + 1) if sc.batch else slice(None)
    with torch.no_grad():
        out["logits"] = model(torch.as_tensor(EVAL[rows])).numpy().copy()
    out["counts"] = model.loop_counts.numpy().copy()
    train_rows = slice(2 * rank, 2 * rank + 2) if sc.batch else slice(None)
    out["loss"] = _train(model, pieces, IDS[train_rows], LABELS[train_rows], cfg, IDS.size)
    out["weights"] = _weights(model)
    out["adam"] = _adam_state(model, pieces[0])
    out["bias"] = model.model.recurrent.block.ffn.router_bias.numpy().copy()
    # skewed loads: each rank's own would move expert 3's bias the other way than the batch's does
    bias = model.model.recurrent.block.ffn.router_bias.clone()
    model.expert_load = torch.tensor(SKEWED[rank] if sc.batch else SKEWED[0] + SKEWED[1])
    model.update_router_bias()
    out["bias_step"] = (model.model.recurrent.block.ffn.router_bias - bias).numpy().copy()
    # the initial file back into the trained, sharded model, and out again: the same bytes. torchtitan's
    # initial_load_in_hf path (to_hf, DCP's HF reader into the DTensor shards, from_hf), where the state dict
    # holds whole tensors or DTensors (ep keeps plain local expert stacks: load_weights); then load_weights
    if "ep" not in sc.strategy:
        adapter = titan.MythosStateDictAdapter(ms.model, folder)
        hf = adapter.to_hf(model.state_dict())
        dcp.load(hf, storage_reader=adapter.get_hf_storage_reader(folder))
        model.load_state_dict(adapter.from_hf(hf))
    else:
        titan.load_weights(model, out["init_file"])
    out["reloaded_file"] = str(titan.save_weights(model, f"{tmp}/{name}-reloaded.safetensors"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    titan.load_weights(model, out["init_file"])
    out["loaded_file"] = str(titan.save_weights(model, f"{tmp}/{name}-loaded.safetensors"))
    dist.barrier()
    return out


def _ranks_main(rank: int, world: int, tmp: str) -> dict[str, object]:
    return {name: _scenario(rank, world, name, tmp) for name in SCENARIOS}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario in one spawn of 2 gloo ranks (a spawn costs more than all the scenarios' steps)."""
    tmp = tmp_path_factory.mktemp("titan-ranks")
    return run_ranks(_ranks_main, 2, str(tmp))


def _unsharded(name: str) -> dict[str, object]:
    sc = SCENARIOS[name]
    ref = mt.build(spec_lib.preset("tiny"), seed=0, dtype=sc.dtype)
    with torch.no_grad():
        out = ref(torch.as_tensor(EVAL))
    model = _materialise(_build(dtype=sc.dtype))
    cfg = _cfg(name)
    pieces = _pieces(model, cfg, sc.loss)
    losses = _train(model, pieces, IDS, LABELS, cfg, IDS.size)
    return {"ref": ref, "logits": out.logits.numpy(), "counts": out.loop_counts.numpy(), "loss": losses,
            "weights": _weights(model), "adam": _adam_state(model, pieces[0]),
            "bias": model.model.recurrent.block.ffn.router_bias.numpy()}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_parallelize_fn_on_two_ranks_equals_unsharded(ranks, name):
    """parallelize_fn from torchtitan's ParallelDims: the sharded forward (each rank its own row, the rows
    halting at different steps) and 3 training steps equal the unsharded model (weights, Adam moments, router
    bias, loss), and the sharded model saves, reloads and saves again the same bytes as the twin's build."""
    sc = SCENARIOS[name]
    want = _unsharded(name)
    assert want["counts"][0].max() != want["counts"][1].max()  # the shards' own early exits would differ
    r0, r1 = ranks[0][name], ranks[1][name]
    assert (r0["strategy"], r0["mesh"]) == (sc.strategy, sc.mesh)
    if "ep" in sc.strategy:
        assert r0["experts"][0] == E // 2  # each rank holds its own experts only
    else:
        assert r0["dtensors"] > 0 and r0["experts"][0] == E
    both = (lambda key: np.concatenate([r0[key], r1[key]])) if sc.batch else (lambda key: r0[key])
    assert _rel(both("logits"), want["logits"]) < sc.tol
    np.testing.assert_array_equal(both("counts"), want["counts"])
    ref_bytes = wb.save(want["ref"], r0["init_file"] + ".ref").read_bytes()
    for key in ("init_file", "reloaded_file", "loaded_file"):
        with open(r0[key], "rb") as f:
            assert f.read() == ref_bytes, key
    losses = np.sum([r0["loss"], r1["loss"]], axis=0) if sc.batch else r0["loss"]
    np.testing.assert_allclose(losses, want["loss"], rtol=sc.tol)
    for r in (r0, r1):
        for k, v in want["weights"].items():
            assert _rel(r["weights"][k], v) < sc.tol, k
        for k, v in want["adam"].items():
            assert _rel(r["adam"][k], v) < 10 * sc.tol, k
        np.testing.assert_array_equal(r["bias"], want["bias"])
    assert np.abs(want["bias"]).sum() > 0
    load = SKEWED[0] + SKEWED[1]
    rate = spec_lib.preset("tiny").moe.bias_update_rate
    for r in (r0, r1):  # the bias moves by the load of the whole batch on every rank
        np.testing.assert_allclose(r["bias_step"], rate * np.sign(load.mean() - load), rtol=1e-6)


def test_parallelize_fn_refuses_what_torchtitans_trainer_cannot_clip():
    from torchtitan.config import TrainingConfig
    from torchtitan.distributed.parallel_dims import ParallelDims

    model = _build()
    for degrees, what in ((dict(tp=2), "strategy tp"), (dict(dp_shard=2, ep=2), "strategy ep")):
        d = dict(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1)
        d.update(degrees)
        pd = ParallelDims(**d, world_size=2)
        with pytest.raises(ValueError, match=f"{what} .* cannot go through torchtitan's Trainer"):
            titan.parallelize_mythos(model, parallel_dims=pd, training=TrainingConfig())


def test_nothing_else_imports_torchtitan():
    """torchtitan is the adapter's alone: no other module of the project imports it (the twins never do)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2]
    pattern = re.compile(r"^\s*(import|from)\s+torchtitan\b", re.M)
    found = [str(f.relative_to(root)) for pkg in ("spec", "mythos_torch", "mythos_jax", "weights_bridge", "parity",
                                                   "mythos") for f in sorted((root / pkg).rglob("*.py"))
             if pattern.search(f.read_text())]
    assert found == ["mythos/titan.py"]
