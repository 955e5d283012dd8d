"""Sharded checkpoints (weights_bridge.sharded_checkpoints): a jax model sharded over 8 fake devices through orbax,
and torch models over gloo ranks (FSDP2, fsdp+ep) through DCP and weights_bridge.save, all equal to the unsharded
model's weights file byte for byte; restored onto another mesh / into fresh sharded models, the same weights and
(jax) the same float64 logits, loop counts and experts.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -m sharded \
        tests/sharded/test_checkpoints_sharded.py
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import spec as S
import weights_bridge as wb

from .ranks import run_ranks

SPEC = {"moe.n_experts": 8}  # 2 experts per rank / device over expert=4, 4 over expert=2


def _bias(n: int) -> np.ndarray:
    """A router bias that is not zero, so that the buffer's travel is checked too."""
    return np.linspace(-0.3, 0.4, n)


# --------------------------------------------------------------------------- jax: orbax


def test_jax_sharded_orbax_round_trip(tmp_path, jax_devices):
    import jax

    import mythos_jax as mj
    from mythos_jax.sharding import make_mesh, shard, shard_batch

    mj.set_parity_precision()
    s = S.load("tiny", overrides=SPEC)

    def model():
        m = mj.build(s, seed=0, dtype="float64")
        m.recurrent.block.ffn.router_bias[...] = _bias(8)
        return m

    plain = model()
    ref = wb.save(plain, tmp_path / "ref.safetensors").read_bytes()

    # fsdp over all 8 devices: each device writes its own shards
    sharded = shard(model(), make_mesh({"data": 8}, jax_devices), "fsdp")
    assert sharded.embed.embedding[...].sharding.spec == jax.sharding.PartitionSpec(None, "data")
    wb.save_orbax(sharded, tmp_path / "fsdp")
    tree = sc_metadata(tmp_path / "fsdp")
    assert "data" in str(tree["embed"]["embedding"].sharding)  # saved as shards, not gathered
    assert wb.orbax_to_safetensors(tmp_path / "fsdp", tmp_path / "a.safetensors").read_bytes() == ref
    assert wb.save(sharded, tmp_path / "b.safetensors").read_bytes() == ref  # bridge.save gathers a sharded jax model

    # restored straight onto another mesh and strategy: placed as the rule table says, same logits
    mesh = make_mesh({"data": 2, "expert": 4}, jax_devices)
    back = wb.load_orbax(tmp_path / "fsdp", mesh, "fsdp+ep")
    assert back.sharding.strategy == ("fsdp", "ep")
    gate = back.recurrent.block.ffn.experts.gate[...]
    assert gate.sharding.spec[0] == "expert" and len(gate.addressable_shards) == 8
    assert gate.addressable_shards[0].data.shape[0] == 2  # 8 experts over expert=4
    assert back.embed.embedding[...].sharding.spec == jax.sharding.PartitionSpec(None, "data")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, s.vocab_size, (8, 12))
    want = mj.forward(plain, ids)
    got = mj.forward(back, shard_batch(back, ids))
    err = float(np.max(np.abs(np.asarray(got.logits) - np.asarray(want.logits))))
    print(f"orbax fsdp -> fsdp+ep: max |logits - unsharded| = {err:.2e}")
    assert err <= 1e-12
    assert np.array_equal(np.asarray(got.loop_counts), np.asarray(want.loop_counts))
    assert np.array_equal(np.asarray(got.traces.expert_idx), np.asarray(want.traces.expert_idx))

    # and the restored sharded model saves back to the same bytes (orbax from the ep layout, then the file)
    wb.save_orbax(back, tmp_path / "ep")
    assert wb.orbax_to_safetensors(tmp_path / "ep", tmp_path / "c.safetensors").read_bytes() == ref
    # a file -> orbax (unsharded) -> onto a mesh
    wb.safetensors_to_orbax(tmp_path / "ref.safetensors", tmp_path / "from_file")
    again = wb.load_orbax(tmp_path / "from_file", {"data": 8}, "fsdp")
    assert again.embed.embedding[...].sharding.spec == jax.sharding.PartitionSpec(None, "data")
    assert wb.save(again, tmp_path / "d.safetensors").read_bytes() == ref
    with pytest.raises(S.SpecError, match="expert"):
        wb.load_orbax(tmp_path / "fsdp", make_mesh({"expert": 8}, jax_devices), "dp")


def sc_metadata(path: Path) -> dict:
    """The orbax checkpoint's array metadata tree (shapes, dtypes, the sharding each array was saved with)."""
    from weights_bridge import sharded_checkpoints as sc

    return sc._orbax_checkpointer().metadata(path).item_metadata["state"].tree


# --------------------------------------------------------------------------- torch: DCP and weights_bridge.save


def _torch_model(seed: int):
    import torch

    import mythos_torch as mt

    mt.set_parity_precision()
    m = mt.build(S.load("tiny", overrides=SPEC), seed=seed, dtype="float64")
    with torch.no_grad():
        m.recurrent.block.ffn.router_bias.copy_(torch.from_numpy(_bias(8)))
    return m


def _two_ranks(rank: int, world: int, tmp: str) -> list[str]:
    """2 ranks, FSDP2 fully_shard by hand (each block, then the root): save_dcp, weights_bridge.save, restore_dcp;
    then the same for ep alone (mythos_torch.sharding.shard over expert=2: plain local expert slices)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from mythos_torch.sharding import make_mesh, shard

    tmp = Path(tmp)
    mesh = init_device_mesh("cpu", (world,))

    def sharded(seed: int):
        m = _torch_model(seed)
        for block in [*m.prelude, m.recurrent.block, *m.coda]:
            fully_shard(block, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    m = sharded(0)
    assert isinstance(m.embed.weight, DTensor) and m.embed.weight.to_local().shape[0] == 64 // world
    assert wb.save_dcp(m, tmp / "dcp") == tmp / "dcp"
    assert wb.save(m, tmp / "fsdp.safetensors") == tmp / "fsdp.safetensors"  # every rank returns the path
    if rank == 0:
        wb.dcp_to_safetensors(tmp / "dcp", tmp / "from_dcp.safetensors")  # no process group used
    other = sharded(5)
    wb.restore_dcp(other, tmp / "dcp")
    wb.save(other, tmp / "restored.safetensors")

    ep_mesh = make_mesh({"expert": world})
    ep = shard(_torch_model(0), ep_mesh, "ep")
    assert ep.recurrent.block.ffn.experts.gate.shape[0] == 8 // world  # this rank's experts only
    wb.save_dcp(ep, tmp / "ep_dcp")
    wb.save(ep, tmp / "ep.safetensors")
    ep_other = shard(_torch_model(5), ep_mesh, "ep")
    wb.restore_dcp(ep_other, tmp / "dcp")  # the FSDP2 checkpoint, read into the ep layout
    wb.save(ep_other, tmp / "ep_restored.safetensors")
    return sorted(os.listdir(tmp / "dcp"))


def test_torch_fsdp2_and_ep_dcp_and_save(tmp_path):
    ref = wb.save(_torch_model(0), tmp_path / "ref.safetensors").read_bytes()
    files = run_ranks(_two_ranks, 2, str(tmp_path))
    assert files[0] == files[1] == [".metadata", "__0_0.distcp", "__1_0.distcp", "mythos.json"]
    assert all((tmp_path / "dcp" / f).stat().st_size > 0 for f in files[0])  # both ranks wrote their shards
    wb.dcp_to_safetensors(tmp_path / "ep_dcp", tmp_path / "ep_from_dcp.safetensors")
    for name in ("fsdp", "from_dcp", "restored", "ep", "ep_from_dcp", "ep_restored"):
        assert (tmp_path / f"{name}.safetensors").read_bytes() == ref, name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial directory left


def _fsdp_ep(rank: int, world: int, tmp: str) -> dict:
    """4 ranks, mythos_torch.shard over data=2 x expert=2 with fsdp+ep: the expert stacks are split over both."""
    from mythos_torch.sharding import make_mesh, shard

    tmp = Path(tmp)
    mesh = make_mesh({"data": 2, "expert": 2})
    m = shard(_torch_model(0), mesh, "fsdp+ep")
    local = m.recurrent.block.ffn.experts.gate
    wb.save_dcp(m, tmp / "dcp")
    wb.save(m, tmp / "ep.safetensors")
    other = shard(_torch_model(5), mesh, "fsdp+ep")
    wb.restore_dcp(other, tmp / "dcp")
    wb.save(other, tmp / "restored.safetensors")
    piece = getattr(local, "to_local", lambda: local)()
    return {"gate_piece": tuple(piece.shape), "files": sorted(os.listdir(tmp / "dcp"))}


def test_torch_fsdp_ep_dcp_and_save(tmp_path):
    ref = wb.save(_torch_model(0), tmp_path / "ref.safetensors").read_bytes()
    out = run_ranks(_fsdp_ep, 4, str(tmp_path))
    # each rank holds 4 of the 8 experts, and half of their width (fsdp splits `embed` over data)
    assert {o["gate_piece"] for o in out} == {(4, 16, 16)}
    assert out[0]["files"] == [".metadata", *(f"__{r}_0.distcp" for r in range(4)), "mythos.json"]
    wb.dcp_to_safetensors(tmp_path / "dcp", tmp_path / "from_dcp.safetensors")  # here: no process group
    for name in ("ep", "from_dcp", "restored"):
        assert (tmp_path / f"{name}.safetensors").read_bytes() == ref, name
