"""weights_bridge: the file format, twin <-> twin transfer, and every refusal (before anything is written)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
from rich.console import Console

import mythos_jax as mj
import mythos_torch as mt
import spec
import weights_bridge as wb
from mythos import cli as mythos_cli
from weights_bridge import convert as cli, fileformat
from weights_bridge.fileformat import BridgeError

DTYPES = ["float32", "float64", "bfloat16"]


def tiny(attn: str = "gqa") -> spec.Spec:
    return spec.preset("tiny", {"attention.type": attn})


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of an array, to compare bit for bit (NaN-safe, -0.0-safe)."""
    return np.ascontiguousarray(a).view(np.uint8)


def assert_same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(bits(a[k]), bits(b[k])), f"{k} differs"


def arrays_of(s: spec.Spec, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    return {p: fileformat.cast(a, fileformat.expected_dtype(p, dtype)) for p, a in spec.init_arrays(s, seed).items()}


def snapshot(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_torch_file_jax_file_torch_is_bitwise(tmp_path, attn, dtype):
    s = tiny(attn)
    torch_model = mt.build(s, seed=3, dtype=dtype)
    first = mt.dump_arrays(torch_model)

    wb.save(torch_model, tmp_path / "a.safetensors")
    jax_model = wb.load(tmp_path / "a.safetensors", backend="jax")
    assert wb.backend_of(jax_model) == "jax"
    assert_same_bits(mj.dump_arrays(jax_model), first)

    wb.save(jax_model, tmp_path / "b.safetensors")
    back = wb.load(tmp_path / "b.safetensors", backend="torch")
    assert_same_bits(mt.dump_arrays(back), first)
    # the file does not depend on which twin wrote it
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_memory_transfer_is_bitwise(dtype):
    s = tiny("mla")
    torch_model = mt.build(s, seed=5, dtype=dtype)
    jax_model = wb.torch_to_jax(torch_model)
    assert_same_bits(mj.dump_arrays(jax_model), mt.dump_arrays(torch_model))
    again = wb.jax_to_torch(jax_model)
    assert_same_bits(mt.dump_arrays(again), mt.dump_arrays(torch_model))
    with pytest.raises(BridgeError, match="needs a mythos_jax model"):
        wb.jax_to_torch(torch_model)
    with pytest.raises(BridgeError, match="needs a mythos_torch model"):
        wb.torch_to_jax(jax_model)


def test_load_in_another_dtype_casts_like_the_twin(tmp_path):
    s = tiny()
    path = wb.save(mt.build(s, seed=1, dtype="float32"), tmp_path / "m.safetensors")
    wide = wb.load(path, backend="jax", dtype="float64")
    want = {p: a.astype(np.float64) for p, a in mt.dump_arrays(mt.build(s, seed=1, dtype="float32")).items()}
    assert_same_bits(mj.dump_arrays(wide), want)
    narrow = wb.load(path, backend="torch", dtype="bfloat16")
    assert_same_bits(mt.dump_arrays(narrow), mj.dump_arrays(wb.load(path, "jax", "bfloat16")))


def test_metadata_and_safetensors_compatibility(tmp_path):
    s = tiny("mla")
    path = wb.save(mt.build(s, seed=2, dtype="bfloat16"), tmp_path / "m.safetensors")
    with safetensors.safe_open(path, framework="pt") as f:  # the reference reader accepts the file
        meta = f.metadata()
        names = list(f.keys())
        embed = f.get_tensor("embed.weight")
    assert meta["format"] == "mythos-weights" and meta["format_version"] == "2" and meta["dtype"] == "bfloat16"
    assert spec.load(meta["spec"]) == s and meta["spec"] == spec.dump(s)
    assert sorted(json.loads(meta["sha256"])) == sorted(names)
    assert sorted(names) == sorted(p.path for p in spec.manifest(s))
    assert str(embed.dtype) == "torch.bfloat16"
    expected = mt.dump_arrays(mt.build(s, seed=2, dtype="bfloat16"))["embed.weight"]
    assert np.array_equal(embed.view(dtype=__import__("torch").int16).numpy(), expected.view(np.int16))
    router = safetensors.torch.load_file(path)["recurrent.block.ffn.router_bias"]
    assert str(router.dtype) == "torch.float32"  # router_bias stays float32 in a bf16 model
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert list(k for k in header if k != "__metadata__") == [p.path for p in spec.manifest(s)]  # manifest order


# --------------------------------------------------------------------------- refusals while writing

WRITE_CASES = {
    "missing": (lambda a: a.pop("recurrent.lora.B"), ["recurrent.lora.B: missing"]),
    "extra": (lambda a: a.update({"recurrent.block.ffn.experts.extra": np.zeros(3, np.float32)}),
              ["recurrent.block.ffn.experts.extra: unexpected"]),
    "shape": (lambda a: a.update({"norm.weight": np.ones(31, np.float32)}), ["norm.weight: shape (31,)"]),
    "dtype": (lambda a: a.update({"embed.weight": a["embed.weight"].astype(np.float64)}), ["embed.weight: dtype float64"]),
    "several": (lambda a: (a.pop("norm.weight"), a.update({"recurrent.lora.B": a["recurrent.lora.B"].T})),
                ["norm.weight: missing", "recurrent.lora.B: shape (32, 4)", "2 problems"]),
}


@pytest.mark.parametrize("case", list(WRITE_CASES))
@pytest.mark.parametrize("existing", [False, True])
def test_write_refuses_before_writing(tmp_path, case, existing):
    s = tiny()
    arrays = arrays_of(s, "float32")
    change, messages = WRITE_CASES[case]
    change(arrays)
    target = tmp_path / "m.safetensors"
    if existing:
        target.write_bytes(b"an existing file")
    before = snapshot(target)
    with pytest.raises(BridgeError) as err:
        wb.write_file(target, s, arrays, "float32")
    for m in messages:
        assert m in str(err.value)
    assert snapshot(target) == before  # absent stays absent, an existing file is untouched
    assert leftovers(tmp_path) == []


def test_bfloat16_router_bias_must_stay_float32(tmp_path):
    s = tiny()
    arrays = arrays_of(s, "bfloat16")
    arrays["recurrent.block.ffn.router_bias"] = arrays["recurrent.block.ffn.router_bias"].astype(ml_dtypes.bfloat16)
    with pytest.raises(BridgeError, match="router_bias: dtype bfloat16 but a bfloat16 model stores it as float32"):
        wb.write_file(tmp_path / "m.safetensors", s, arrays, "bfloat16")
    assert not (tmp_path / "m.safetensors").exists()


def test_failure_mid_write_leaves_no_partial_file(tmp_path):
    s = tiny()
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"previous")

    def boom(name, nbytes):
        if name.startswith("recurrent"):
            raise KeyboardInterrupt  # even an interrupt cleans up

    with pytest.raises(KeyboardInterrupt):
        wb.write_file(target, s, arrays_of(s, "float32"), "float32", progress=boom)
    assert target.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []
    with pytest.raises(BridgeError, match="does not exist"):
        wb.write_file(tmp_path / "no" / "m.safetensors", s, arrays_of(s, "float32"), "float32")


def test_unknown_dtype_and_backend(tmp_path):
    s = tiny()
    with pytest.raises(BridgeError, match="dtype='float16' is not supported"):
        wb.write_file(tmp_path / "m.safetensors", s, arrays_of(s, "float32"), "float16")
    path = wb.write_file(tmp_path / "m.safetensors", s, arrays_of(s, "float32"), "float32")
    with pytest.raises(BridgeError, match="backend='tf'"):
        wb.load(path, backend="tf")
    with pytest.raises(BridgeError, match="not a Mythos model"):
        wb.save(np.zeros(3), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------- refusals while reading


def write_raw(path: Path, header: dict, data: bytes, pad: bool = True) -> Path:
    """A safetensors file with a hand-made header (to forge what our writer never produces)."""
    head = json.dumps(header).encode()
    if pad:
        head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + data)
    return path


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@pytest.fixture
def good_file(tmp_path) -> Path:
    return wb.write_file(tmp_path / "good.safetensors", tiny(), arrays_of(tiny(), "float32"), "float32")


def reseal(header: dict) -> dict:
    """Recompute header_sha256 after an edit, as a forger could: the checks behind the checksum still hold."""
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and "header_sha256" in meta:
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        meta["header_sha256"] = json.dumps(fileformat.header_digests(meta, entries), sort_keys=True)
    return header


def forge(good: Path, edit) -> Path:
    header, data = split_file(good)
    data = edit(header, data)
    return write_raw(good.with_name("forged.safetensors"), reseal(header), data)


def _other_spec(h, d):
    h["__metadata__"]["spec"] = spec.dump(spec.preset("tiny", {"dim": 48}))
    return d


def _drop_tensor(h, d):
    b, e = h.pop("norm.weight")["data_offsets"]
    for v in h.values():
        if "data_offsets" in v and v["data_offsets"][0] >= e:
            v["data_offsets"] = [o - (e - b) for o in v["data_offsets"]]
    return d[:b] + d[e:]


def _retag(h, d):
    h["norm.weight"]["dtype"] = "I32"  # same byte size, wrong type
    return d


def _flip_byte(h, d):
    b, _ = h["recurrent.act.halt.weight"]["data_offsets"]
    return d[:b] + bytes([d[b] ^ 0x40]) + d[b + 1:]


def _overlap(h, d):
    h["norm.weight"]["data_offsets"] = [0, h["norm.weight"]["data_offsets"][1] - h["norm.weight"]["data_offsets"][0]]
    return d


READ_CASES = {
    "foreign metadata": (lambda h, d: h.__setitem__("__metadata__", {"format": "pt"}) or d, "is not a Mythos weights file: metadata format='pt'"),
    "no metadata": (lambda h, d: h.pop("__metadata__") and d, "is not a Mythos weights file"),
    "future version": (lambda h, d: h["__metadata__"].__setitem__("format_version", "3") or d, "format_version='3' is not supported"),
    "bad dtype": (lambda h, d: h["__metadata__"].__setitem__("dtype", "int8") or d, "metadata dtype='int8'"),
    "invalid spec": (lambda h, d: h["__metadata__"].__setitem__("spec", "dim: -1\nvocab_size: 3\nmax_seq_len: 4\n") or d, "spec in the metadata is not valid"),
    "spec mismatch": (_other_spec, "embed.weight: shape (64, 32) but the spec says (64, 48)"),
    "missing tensor": (_drop_tensor, "norm.weight: missing from the file"),
    "wrong dtype tag": (_retag, "norm.weight: dtype int32 but a float32 model stores it as float32"),
    "corrupt data": (_flip_byte, "recurrent.act.halt.weight: checksum mismatch"),
    "overlapping ranges": (_overlap, "overlap or gap"),
}


@pytest.mark.parametrize("case", list(READ_CASES))
def test_read_refuses(good_file, case):
    edit, message = READ_CASES[case]
    bad = forge(good_file, edit)
    with pytest.raises(BridgeError) as err:
        wb.load(bad, backend="torch")
    assert message in str(err.value)


def test_file_from_another_writer_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.numpy.save_file({"embed.weight": np.zeros((4, 4), np.float32)}, path)
    with pytest.raises(BridgeError, match="not a Mythos weights file.*convert"):
        wb.load(path)


@pytest.mark.parametrize("cut", ["empty", "length only", "inside header", "inside data", "one byte short"])
def test_truncated_file_is_refused(good_file, cut):
    raw = good_file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    keep = {"empty": 0, "length only": 8, "inside header": 8 + n // 2, "inside data": 8 + n + 100, "one byte short": len(raw) - 1}[cut]
    good_file.write_bytes(raw[:keep])
    with pytest.raises(BridgeError, match="truncated or corrupt"):
        wb.read_file(good_file)


@pytest.mark.parametrize("junk", [b"\xff" * 8 + b"{}", (16).to_bytes(8, "little") + b"not json at all!", (2).to_bytes(8, "little") + b"[]"])
def test_corrupt_header_is_refused(tmp_path, junk):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(junk)
    with pytest.raises(BridgeError, match="truncated or corrupt"):
        wb.load(path, backend="jax")


def test_trailing_bytes_are_refused(good_file):
    good_file.write_bytes(good_file.read_bytes() + b"\0" * 4)
    with pytest.raises(BridgeError, match="4 trailing bytes"):
        wb.read_file(good_file)


def test_convert_from_a_bad_file_writes_nothing(tmp_path, good_file):
    bad = forge(good_file, _flip_byte)
    out = tmp_path / "out.safetensors"
    with pytest.raises(BridgeError, match="checksum mismatch"):
        cli.convert(bad, out, dtype="bfloat16")
    assert not out.exists()
    out.write_bytes(b"keep me")
    with pytest.raises(BridgeError):
        cli.convert(bad, out)
    assert out.read_bytes() == b"keep me"
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- convert and check


def test_convert_recasts_our_file(tmp_path, good_file):
    res = cli.convert(good_file, tmp_path / "f64.safetensors", dtype="float64")
    assert res.dtype == "float64" and res.n_tensors == len(spec.manifest(tiny()))
    s, arrays, dtype = wb.read_file(res.path)
    assert dtype == "float64" and s == tiny()
    _, original, _ = wb.read_file(good_file)
    assert_same_bits(arrays, {p: a.astype(np.float64) for p, a in original.items()})
    with pytest.raises(BridgeError, match="carries its own spec"):
        cli.convert(good_file, tmp_path / "x.safetensors", config="mythos_1b")
    with pytest.raises(BridgeError, match="onto itself"):
        cli.convert(good_file, good_file)


def test_progress_is_reported_per_tensor(tmp_path, good_file, monkeypatch):
    seen: list[tuple[str, int]] = []
    _, arrays, _ = wb.read_file(good_file, progress=lambda name, n: seen.append((name, n)))
    assert [n for n, _ in seen] == [p.path for p in spec.manifest(tiny())]
    assert [b for _, b in seen] == [a.nbytes for a in arrays.values()]
    monkeypatch.setattr(mythos_cli, "PROGRESS_MIN_BYTES", 0)  # draw the rich bar even for a tiny file
    out = io.StringIO()
    bar = mythos_cli.progress_bar(Console(file=out, force_terminal=True))
    res = cli.convert(good_file, tmp_path / "bf16.safetensors", dtype="bfloat16", progress=bar)
    assert res.dtype == "bfloat16" and "writing" in out.getvalue()


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_check_compares_the_twins(tmp_path, backend):
    path = wb.save(mt.build(tiny("mla"), seed=4, dtype="float64"), tmp_path / "m.safetensors")
    res = cli.check(path, backend=backend)
    assert (res.backend, res.other) == (backend, {"torch": "jax", "jax": "torch"}[backend])
    assert res.ok and res.loop_counts_equal and res.n_steps[0] == res.n_steps[1]
    print(f"check {backend}: max |dlogit| = {res.max_abs_diff:.3e}, mean {res.mean_abs_diff:.3e}")
    assert res.max_abs_diff <= 1e-12  # float64 twins on the tiny model agree to ~1e-16


# --------------------------------------------------------------------------- the backend registry


def test_backend_registry():
    from weights_bridge import backends

    assert backends.BACKENDS == ("torch", "jax") and backends.twin("torch") is mt and backends.twin("jax") is mj
    assert [backends.other(b) for b in backends.BACKENDS] == ["jax", "torch"]
    with pytest.raises(BridgeError, match="backend='mxnet' is not allowed; allowed: torch, jax"):
        backends.twin("mxnet")
    s = tiny()
    models = {"torch": mt.build(s, seed=1, dtype="bfloat16"), "jax": mj.build(s, seed=1, dtype="bfloat16")}
    assert {b: wb.backend_of(m) for b, m in models.items()} == {"torch": "torch", "jax": "jax"}
    ids = np.arange(6).reshape(1, 6)
    logits = {b: backends.to_numpy(backends.forward(b, m, ids, 2).logits) for b, m in models.items()}
    for b, a in logits.items():  # the same exact NumPy type from both twins; widen is exact
        assert a.dtype == ml_dtypes.bfloat16 and a.shape == (1, 6, s.vocab_size), b
        assert backends.dtype_of(a) == "bfloat16" and backends.widen(a).dtype == np.float32
        np.testing.assert_array_equal(backends.widen(a).astype(ml_dtypes.bfloat16), a)
    assert backends.dtype_of(models["torch"].embed.weight) == "bfloat16"


# --------------------------------------------------------------------------- hygiene


def test_no_pickle_anywhere():
    root = Path(wb.__file__).parent
    for f in root.glob("*.py"):
        text = f.read_text()
        if f.name == "sharded_checkpoints.py":  # DCP's index is a pickle: read only through a find_class allow-list
            assert "def find_class" in text and not re.search(r"pickle\.(loads?|Unpickler\(.*\)\.load)\(", text), f
        else:
            assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill)\b", text, re.M), f
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (f, call)
