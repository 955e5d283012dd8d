"""weights_bridge.sharded_checkpoints without extra processes: orbax and DCP directories <-> the Mythos weights
file, bit for bit, and every refusal (nothing written). The sharded round trips are in tests/sharded."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import mythos_jax as mj
import mythos_torch as mt
import spec
import weights_bridge as wb
from weights_bridge import sharded_checkpoints as sc
from weights_bridge.fileformat import BridgeError, read_header

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(attn: str = "gqa") -> spec.Spec:
    return spec.preset("tiny", {"attention.type": attn})


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.ascontiguousarray(a[k]).tobytes() == np.ascontiguousarray(b[k]).tobytes(), f"{k} differs"


def leftovers(d: Path) -> list[str]:
    """Hidden partial / old checkpoint directories a save left behind."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def jax_model():
    """A float64 jax model whose router bias is not zero (the buffer travels too)."""
    m = mj.build(tiny(), seed=3, dtype="float64")
    m.recurrent.block.ffn.router_bias[...] = np.linspace(-0.5, 0.5, 4)
    return m


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype,attn", [("float64", "gqa"), ("bfloat16", "mla")])
def test_orbax_round_trip_is_bitwise(tmp_path, dtype, attn):
    m = mj.build(tiny(attn), seed=1, dtype=dtype)
    ref = wb.save(m, tmp_path / "ref.safetensors").read_bytes()
    wb.save_orbax(m, tmp_path / "orbax")
    assert {"mythos", "state"} <= set(os.listdir(tmp_path / "orbax"))
    # orbax -> file: the bytes bridge.save writes (so the header's digests are equal too)
    assert wb.orbax_to_safetensors(tmp_path / "orbax", tmp_path / "a.safetensors").read_bytes() == ref
    # file -> orbax -> file
    wb.safetensors_to_orbax(tmp_path / "ref.safetensors", tmp_path / "orbax2")
    assert wb.orbax_to_safetensors(tmp_path / "orbax2", tmp_path / "b.safetensors").read_bytes() == ref
    meta, _, _ = read_header(tmp_path / "b.safetensors")
    assert meta["sha256"] == read_header(tmp_path / "ref.safetensors")[0]["sha256"]
    # the restored model holds the same bits (its logits on a mesh: tests/sharded/test_checkpoints_sharded.py)
    back = wb.load_orbax(tmp_path / "orbax2")
    same_bits(mj.dump_arrays(back), mj.dump_arrays(m))
    assert back.spec == m.spec and back.sharding is None
    assert leftovers(tmp_path) == []


def test_orbax_keeps_the_router_bias(tmp_path, jax_model):
    wb.save_orbax(jax_model, tmp_path / "o")
    back = wb.load_orbax(tmp_path / "o")
    assert np.array_equal(np.asarray(back.recurrent.block.ffn.router_bias[...]), np.linspace(-0.5, 0.5, 4))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dcp_round_trip_is_bitwise(tmp_path, dtype):
    m = mt.build(tiny(), seed=2, dtype=dtype)
    ref = wb.save(m, tmp_path / "ref.safetensors").read_bytes()
    # file -> DCP -> file, no process group
    wb.safetensors_to_dcp(tmp_path / "ref.safetensors", tmp_path / "dcp")
    assert {".metadata", "mythos.json"} <= set(os.listdir(tmp_path / "dcp"))
    assert wb.dcp_to_safetensors(tmp_path / "dcp", tmp_path / "a.safetensors").read_bytes() == ref
    # model -> DCP -> file
    wb.save_dcp(m, tmp_path / "dcp2")
    assert wb.dcp_to_safetensors(tmp_path / "dcp2", tmp_path / "b.safetensors").read_bytes() == ref
    same_bits(mt.dump_arrays(wb.load_dcp(tmp_path / "dcp2")), mt.dump_arrays(m))
    # read back into another model in place
    other = mt.build(tiny(), seed=9, dtype=dtype)
    assert wb.restore_dcp(other, tmp_path / "dcp") is other
    same_bits(mt.dump_arrays(other), mt.dump_arrays(m))
    assert leftovers(tmp_path) == []


def test_jax_orbax_to_torch_dcp_and_back(tmp_path, jax_model):
    """orbax (jax twin) -> file -> DCP (torch twin) -> file -> orbax: every array the same bits."""
    wb.save_orbax(jax_model, tmp_path / "o")
    wb.orbax_to_safetensors(tmp_path / "o", tmp_path / "1.safetensors")
    wb.safetensors_to_dcp(tmp_path / "1.safetensors", tmp_path / "d")
    torch_model = wb.load_dcp(tmp_path / "d")
    same_bits(mt.dump_arrays(torch_model), mj.dump_arrays(jax_model))
    wb.save_dcp(torch_model, tmp_path / "d2")
    wb.dcp_to_safetensors(tmp_path / "d2", tmp_path / "2.safetensors")
    assert (tmp_path / "2.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()


def test_foreign_dcp_needs_the_spec(tmp_path):
    """A DCP directory another trainer wrote (no mythos.json): converted once the spec is given."""
    import torch.distributed.checkpoint as dcp

    m = mt.build(tiny(), seed=4, dtype="float32")
    with pytest.warns(UserWarning):
        dcp.save(m.state_dict(), checkpoint_id=tmp_path / "foreign", no_dist=True)
    with pytest.raises(BridgeError, match=r"foreign: a DCP checkpoint without mythos.json .* pass spec="):
        wb.dcp_to_safetensors(tmp_path / "foreign", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    got = wb.dcp_to_safetensors(tmp_path / "foreign", tmp_path / "x.safetensors", spec=m.spec).read_bytes()
    assert got == wb.save(m, tmp_path / "ref.safetensors").read_bytes()
    with pytest.raises(BridgeError, match=r"(?s)does not match its spec.*recurrent.block.ffn.experts.gate: shape"):
        wb.dcp_to_safetensors(tmp_path / "foreign", tmp_path / "y.safetensors",
                              spec=spec.preset("tiny", {"moe.n_experts": 8}))
    assert not (tmp_path / "y.safetensors").exists()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("read", [wb.load_orbax, lambda d: wb.orbax_to_safetensors(d, d.parent / "x.safetensors"),
                                  wb.load_dcp, lambda d: wb.dcp_to_safetensors(d, d.parent / "x.safetensors")],
                         ids=["load_orbax", "orbax_to_safetensors", "load_dcp", "dcp_to_safetensors"])
def test_missing_file_and_foreign_directories(tmp_path, read):
    with pytest.raises(BridgeError, match=r"nope: no such directory"):
        read(tmp_path / "nope")
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(BridgeError, match=r"f is a file, not an? (orbax|DCP) checkpoint directory"):
        read(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BridgeError, match=r"empty is not a (Mythos orbax|DCP) checkpoint"):
        read(tmp_path / "empty")
    assert not (tmp_path / "x.safetensors").exists()


def test_the_wrong_kind_of_checkpoint_is_named(tmp_path, jax_model):
    wb.save_orbax(jax_model, tmp_path / "o")
    with pytest.raises(BridgeError, match=r"o is not a DCP checkpoint.*an orbax checkpoint: use orbax_to_safetensors"):
        wb.dcp_to_safetensors(tmp_path / "o", tmp_path / "x.safetensors")
    wb.safetensors_to_dcp(wb.save(jax_model, tmp_path / "m.safetensors"), tmp_path / "d")
    with pytest.raises(BridgeError, match=r"d is not a Mythos orbax checkpoint.*a DCP checkpoint: use dcp_to_"):
        wb.orbax_to_safetensors(tmp_path / "d", tmp_path / "x.safetensors")
    with pytest.raises(BridgeError, match=r"save_orbax needs a mythos_jax model, got a torch one.*save_dcp"):
        wb.save_orbax(mt.build(tiny()), tmp_path / "o2")
    with pytest.raises(BridgeError, match=r"save_dcp needs a mythos_torch model, got a jax one.*save_orbax"):
        wb.save_dcp(jax_model, tmp_path / "d2")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "o2").exists()
    assert not (tmp_path / "d2").exists()


def test_arrays_that_do_not_match_the_spec_are_listed(tmp_path, jax_model):
    s = jax_model.spec
    arrays = mj.dump_arrays(jax_model)
    names = sc._nnx_names(s)
    state = {n: (np.ascontiguousarray(arrays[p.path].T) if p.kind == "linear" else arrays[p.path])
             for n, p in names.items()}
    del state["norm.weight"]
    state["embed.embedding"] = state["embed.embedding"][:, :16]
    state["extra.kernel"] = np.zeros(3)
    sc._write_orbax(tmp_path / "o", state, s, "float64", overwrite=False)
    with pytest.raises(BridgeError, match=r"o does not match its spec: 3 problems") as e:
        wb.orbax_to_safetensors(tmp_path / "o", tmp_path / "x.safetensors")
    assert any(line.startswith("norm.weight: missing") for line in e.value.errors)
    assert any(line.startswith("embed.weight: shape (64, 16)") for line in e.value.errors)
    assert any(line.startswith("extra.kernel: unexpected") for line in e.value.errors)
    with pytest.raises(BridgeError, match=r"does not match its spec"):
        wb.load_orbax(tmp_path / "o")
    # DCP: the same from the index, before any tensor is read
    import torch

    sd = {k: torch.from_numpy(a.copy()) for k, a in arrays.items() if k != "norm.weight"}
    sd["embed.weight"] = sd["embed.weight"].float()
    sc._write_dcp(tmp_path / "d", sd, s, "float64", no_dist=True)
    with pytest.raises(BridgeError, match=r"d does not match its spec: 2 problems") as e:
        wb.dcp_to_safetensors(tmp_path / "d", tmp_path / "x.safetensors")
    assert sorted(line.split(":")[0] for line in e.value.errors) == ["embed.weight", "norm.weight"]
    assert "dtype float32 but a float64 model stores it as float64" in str(e.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_an_edited_spec_is_refused(tmp_path, jax_model):
    wb.save_orbax(jax_model, tmp_path / "o")
    wb.safetensors_to_dcp(wb.save(jax_model, tmp_path / "m.safetensors"), tmp_path / "d")
    for meta_file in (tmp_path / "o" / "mythos" / "metadata", tmp_path / "d" / "mythos.json"):
        meta = json.loads(meta_file.read_text())
        assert "threshold: 0.99" in meta["spec"]
        meta_file.write_text(json.dumps({**meta, "spec": meta["spec"].replace("threshold: 0.99", "threshold: 0.09")}))
    with pytest.raises(BridgeError, match=r"o: the spec in the metadata was changed after the checkpoint was written"):
        wb.load_orbax(tmp_path / "o")
    with pytest.raises(BridgeError, match=r"d: the spec in the metadata was changed after the checkpoint was written"):
        wb.load_dcp(tmp_path / "d")
    (tmp_path / "d" / "mythos.json").write_text("{not json")
    with pytest.raises(BridgeError, match=r"mythos.json: not valid JSON"):
        wb.dcp_to_safetensors(tmp_path / "d", tmp_path / "x.safetensors")


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_a_hostile_dcp_index_runs_no_code(tmp_path, jax_model):
    wb.safetensors_to_dcp(wb.save(jax_model, tmp_path / "m.safetensors"), tmp_path / "d")
    (tmp_path / "d" / ".metadata").write_bytes(pickle.dumps(_Evil(str(tmp_path / "pwned"))))
    with pytest.raises(BridgeError, match=r"\.metadata: not a DCP index this reader accepts .*posix.mkdir is not part"):
        wb.dcp_to_safetensors(tmp_path / "d", tmp_path / "x.safetensors")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "x.safetensors").exists()
    (tmp_path / "d" / ".metadata").write_bytes(b"\x80\x04truncated")
    with pytest.raises(BridgeError, match=r"not a DCP index this reader accepts"):
        wb.load_dcp(tmp_path / "d")


def test_targets_are_never_clobbered(tmp_path, jax_model):
    wb.save_orbax(jax_model, tmp_path / "o")
    with pytest.raises(BridgeError, match=r"refusing to write .*o: it exists; pass overwrite=True"):
        wb.save_orbax(jax_model, tmp_path / "o")
    wb.save_orbax(jax_model, tmp_path / "o", overwrite=True)  # replaces a checkpoint of the same kind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for save in (lambda p: wb.save_orbax(jax_model, p, overwrite=True),
                 lambda p: wb.safetensors_to_dcp(tmp_path / "m.safetensors", p, overwrite=True)):
        wb.save(jax_model, tmp_path / "m.safetensors")
        with pytest.raises(BridgeError, match=r"refusing to replace .*mine: it is not a Mythos (orbax|DCP) checkpoint"):
            save(tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    with pytest.raises(BridgeError, match=r"refusing to write .*o: directory .*missing does not exist"):
        wb.save_orbax(jax_model, tmp_path / "missing" / "o")
    # a corrupt source: refused before anything is written
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(BridgeError, match=r"bad.safetensors is corrupt"):
        wb.safetensors_to_orbax(tmp_path / "bad.safetensors", tmp_path / "o3")
    with pytest.raises(BridgeError, match=r"bad.safetensors is corrupt"):
        wb.safetensors_to_dcp(tmp_path / "bad.safetensors", tmp_path / "d3")
    assert not (tmp_path / "o3").exists() and not (tmp_path / "d3").exists()
    assert leftovers(tmp_path) == []
