"""Hardening of the files (issue 17): checksummed headers, specs that are text only, bad paths, pickles.

One test per reproduction, then a hypothesis fuzz tier: mutated weights files (bit flips in header
and data, truncations, header edits, garbage) through the file loader, and bad inputs through the
writer. Only a BridgeError may escape, nothing is written on failure, and a valid file still loads.
The default tier is small and derandomized; `-m slow -s` runs a larger one and prints the tally.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from functools import cache
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spec
import weights_bridge as wb
from weights_bridge import fileformat as ff
from weights_bridge import openmythos as om
from weights_bridge.fileformat import BridgeError


def tiny() -> spec.Spec:
    return spec.preset("tiny")


def arrays_of(s: spec.Spec, dtype: str) -> dict[str, np.ndarray]:
    return {p: ff.cast(a, ff.expected_dtype(p, dtype)) for p, a in spec.init_arrays(s, seed=1).items()}


def split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + data


def reseal(header: dict) -> dict:
    """Recompute header_sha256 as a forger could (a checksum is not a signature)."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    header["__metadata__"]["header_sha256"] = json.dumps(ff.header_digests(header["__metadata__"], entries), sort_keys=True)
    return header


def listing(d: Path) -> list[tuple[str, int, int]]:
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir())


@pytest.fixture
def good(tmp_path) -> Path:
    return wb.write_file(tmp_path / "good.safetensors", tiny(), arrays_of(tiny(), "float32"), "float32")


# --------------------------------------------------------------------------- the header checksum


def test_header_spec_edited_is_refused(good):
    header, data = split(good.read_bytes())
    assert "threshold: 0.99" in header["__metadata__"]["spec"]
    header["__metadata__"]["spec"] = header["__metadata__"]["spec"].replace("threshold: 0.99", "threshold: 0.09")
    good.write_bytes(join(header, data))
    with pytest.raises(BridgeError) as err:
        wb.read_file(good)
    assert str(err.value).startswith(f"{good}: the header was changed after the file was written")
    assert "metadata 'spec': changed (checksum mismatch)" in str(err.value)
    with pytest.raises(BridgeError, match="metadata 'spec': changed"):
        wb.read_spec(good)  # the header-only reader checks it too


@pytest.mark.parametrize("edit,part", [
    (lambda h: h["__metadata__"].__setitem__("dtype", "float64"), "metadata 'dtype': changed"),
    (lambda h: h["__metadata__"].__setitem__("extra", "x"), "metadata 'extra': not covered by the checksum"),
    (lambda h: h["__metadata__"].pop("spec"), "metadata 'spec': missing (removed after writing)"),
    (lambda h: h["norm.weight"].__setitem__("shape", [1, 32]), "the tensor table (names, dtypes, shapes, byte ranges): changed"),
    (lambda h: h["__metadata__"].__setitem__("header_sha256", "{"), "are not valid JSON"),
    (lambda h: h["__metadata__"].pop("header_sha256"), "metadata has no 'header_sha256' checksum"),
])
def test_every_header_edit_is_refused(good, edit, part):
    header, data = split(good.read_bytes())
    edit(header)
    good.write_bytes(join(header, data))
    with pytest.raises(BridgeError) as err:
        wb.read_file(good)
    assert str(err.value).startswith(str(good)) and part in str(err.value)


def test_header_spec_as_a_path_or_preset_is_refused(good, tmp_path):
    other = tmp_path / "other.yaml"  # a valid spec the old reader would have loaded from the path
    other.write_text(spec.dump(spec.load("tiny", {"halting.threshold": 0.09})))
    for ref in (str(other), "tiny", "../../spec/presets/tiny.yaml"):
        header, data = split(good.read_bytes())
        header["__metadata__"]["spec"] = ref
        good.write_bytes(join(reseal(header), data))  # even with a recomputed checksum
        with pytest.raises(BridgeError, match="the spec in the metadata is not valid: .*metadata spec: a spec must be a YAML mapping of fields, got str"):
            wb.read_file(good)


def test_header_spec_is_loaded_with_the_hardened_loader(good):
    header, data = split(good.read_bytes())
    header["__metadata__"]["spec"] = "a: &x [1]\n" + header["__metadata__"]["spec"]
    good.write_bytes(join(reseal(header), data))
    with pytest.raises(BridgeError, match="metadata spec, line 1: YAML anchors"):
        wb.read_file(good)


def test_old_version_file_is_refused(good):
    header, data = split(good.read_bytes())
    meta = header["__metadata__"]
    meta["format_version"] = "1"
    del meta["header_sha256"]  # what a version-1 writer produced
    good.write_bytes(join(header, data))
    with pytest.raises(BridgeError, match=r"format_version '1' is no longer read: version 1 has no checksum over its header.*Re-convert it"):
        wb.read_file(good)


def test_header_size_is_bounded_before_parsing(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write((ff.MAX_HEADER_BYTES + 8).to_bytes(8, "little"))
        f.truncate(ff.MAX_HEADER_BYTES + 64)  # sparse: the length field is consistent with the file size
    t0 = time.perf_counter()
    with pytest.raises(BridgeError, match=f"more than the {ff.MAX_HEADER_BYTES}"):
        wb.read_file(path)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("header_text,message", [
    ('{"__metadata__":{"format":"mythos-weights"},"__metadata__":{}}', "duplicate key '__metadata__'"),
    ('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}', "NaN is not a JSON number"),
    ('[' * 5000 + ']' * 5000, "not valid JSON"),
    ('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', "malformed header entry"),
    ('{"a":{"dtype":"F32","shape":[' + "9" * 30 + '],"data_offsets":[0,4]}}', "does not hold shape"),
])
def test_hostile_json_headers(tmp_path, header_text, message):
    path = tmp_path / "h.safetensors"
    head = header_text.encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head)
    with pytest.raises(BridgeError, match="truncated or corrupt") as err:
        wb.read_file(path)
    assert message in str(err.value)


# --------------------------------------------------------------------------- paths


def test_directory_given_as_a_file(tmp_path):
    (tmp_path / "m.safetensors").mkdir()
    with pytest.raises(BridgeError, match=r"m\.safetensors is a directory, not a weights file"):
        wb.read_file(tmp_path / "m.safetensors")
    with pytest.raises(BridgeError, match="is a directory"):
        wb.read_spec(tmp_path)
    with pytest.raises(BridgeError, match=r"refusing to write .*m\.safetensors: it is a directory"):
        wb.write_file(tmp_path / "m.safetensors", tiny(), arrays_of(tiny(), "float32"), "float32")
    with pytest.raises(BridgeError, match=r"no such file"):
        wb.read_file(tmp_path / "absent.safetensors")


def test_save_to_a_bad_path_is_a_bridge_error(tmp_path):
    import mythos_torch as mt

    model = mt.build(tiny(), seed=0)
    (tmp_path / "file").write_text("x")
    before = listing(tmp_path)
    for bad, message in [
        (tmp_path / "file" / "m.safetensors", "is not a directory"),
        (tmp_path / "missing" / "m.safetensors", "does not exist"),
        (tmp_path / ("n" * 300 + ".safetensors"), "cannot write .*File name too long"),
        (Path("/proc/m.safetensors"), "cannot write"),
        (tmp_path / "a\0b.safetensors", "contains a NUL byte"),
    ]:
        with pytest.raises(BridgeError, match=message):
            wb.save(model, bad)
    assert listing(tmp_path) == before  # nothing left behind, no temp file


def test_float64_files_round_trip_at_the_file_layer(tmp_path):
    s = tiny()
    arrays = arrays_of(s, "float64")
    path = wb.write_file(tmp_path / "f64.safetensors", s, arrays, "float64")
    s2, back, dtype = wb.read_file(path)
    assert s2 == s and dtype == "float64"
    assert all(back[k].dtype == np.float64 and np.array_equal(back[k], arrays[k]) for k in arrays)
    ref = safetensors.numpy.load_file(path)  # the reference reader agrees
    assert all(np.array_equal(ref[k], arrays[k]) for k in arrays)


# --------------------------------------------------------------------------- the reusable primitive


def test_write_arrays_read_arrays_round_trip(tmp_path):
    arrays = {"step": np.asarray(7, np.int64), "exp_avg/embed.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
              "exp_avg_sq/x": np.ones(3, ml_dtypes.bfloat16), "f64": np.full((2,), 0.1), "mask": np.array([True, False])}
    path = ff.write_arrays(tmp_path / "opt.safetensors", arrays, format="mythos-train-state",
                           metadata={"mythos_train": json.dumps({"step": 7})})
    back, meta = ff.read_arrays(path, format="mythos-train-state")
    assert list(back) == list(arrays) and meta == {"mythos_train": '{"step": 7}'}
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape and np.array_equal(back[k], a)
    assert safetensors.numpy.load_file(path).keys() == arrays.keys()
    with pytest.raises(BridgeError, match="is not a mythos-weights file|is not a Mythos weights file"):
        wb.read_file(path)
    with pytest.raises(BridgeError, match="is not a mythos-train-state file.*it is a mythos-weights file"):
        ff.read_arrays(wb.write_file(tmp_path / "w.safetensors", tiny(), arrays_of(tiny(), "float32"), "float32"),
                       format="mythos-train-state")
    header, data = split(path.read_bytes())
    header["__metadata__"]["mythos_train"] = json.dumps({"step": 8})
    path.write_bytes(join(header, data))
    with pytest.raises(BridgeError, match="metadata 'mythos_train': changed"):
        ff.read_arrays(path, format="mythos-train-state")


@pytest.mark.parametrize("arrays,metadata,message", [
    ({"a": np.zeros(2)}, {"format": "x"}, "metadata 'format': reserved"),
    ({"a": np.zeros(2)}, {"k": 3}, "keys and values must be strings, got int"),
    ({"a": np.zeros(2, np.complex64)}, {}, "a: dtype complex64 cannot be stored"),
    ({"": np.zeros(2)}, {}, "a tensor name must be a non-empty string"),
    ({"a": np.array(["s"])}, {}, "cannot be stored"),
])
def test_write_arrays_refuses_before_writing(tmp_path, arrays, metadata, message):
    before = listing(tmp_path)
    with pytest.raises(BridgeError, match=message):
        ff.write_arrays(tmp_path / "x.safetensors", arrays, format="t", metadata=metadata)
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------- open-mythos inputs


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_refusal_is_our_own_message(tmp_path):
    import torch

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"embed.weight": torch.zeros(2), "x": Evil(str(marker))}, path)
    with pytest.raises(BridgeError) as err:
        om.read_state_dict(path)
    message = str(err.value)
    assert "loading it would run code stored in the file" in message and "trusted environment" in message
    assert "weights_only=False" not in message and "weights_only" not in message
    assert not marker.exists()
    torch.save({"embed.weight": torch.zeros(2)}, tmp_path / "ok.pt")
    assert list(om.read_state_dict(tmp_path / "ok.pt")) == ["embed.weight"]
    with pytest.raises(BridgeError, match="is a directory, not a torch checkpoint"):
        om.read_state_dict(tmp_path)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:50])
    with pytest.raises(BridgeError, match="not a readable torch checkpoint"):
        om.read_state_dict(tmp_path / "cut.pt")


def test_open_mythos_config_files_use_the_hardened_loader(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("dim: &d 64\nn_heads: *d\n")
    with pytest.raises(BridgeError, match=r"config file .*cfg\.yaml, line 1: YAML anchors"):
        om.spec_from_config(path)
    path.write_bytes(b"dim: \xff\n")
    with pytest.raises(BridgeError, match="is not UTF-8 text"):
        om.spec_from_config(path)
    (tmp_path / "cfg.json").write_text('{"dim": 64, "dim": 32}')
    assert om.spec_from_config(tmp_path / "cfg.json").dim == 32  # JSON: json.loads semantics (last wins)
    with pytest.raises(BridgeError, match="is a directory"):
        om.spec_from_config(tmp_path)


# --------------------------------------------------------------------------- fuzz tier


@cache
def good_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return wb.write_file(Path(d) / "g.safetensors", tiny(), arrays_of(tiny(), "float32"), "float32").read_bytes()


@cache
def good_content() -> tuple[spec.Spec, dict[str, np.ndarray]]:
    return tiny(), arrays_of(tiny(), "float32")


def header_len() -> int:
    return int.from_bytes(good_bytes()[:8], "little")


TALLY: dict[str, Counter] = {"file mutations": Counter(), "writes": Counter()}


def classify_read(raw: bytes) -> str:
    """'unchanged' (the bytes are the good file's and it loads equal), 'clear' (BridgeError),
    'traceback' (anything else), 'silent' (changed bytes that loaded)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(raw)
        before = listing(Path(d))
        try:
            s, arrays, _ = wb.read_file(path)
        except BridgeError as e:
            assert 0 < len(str(e)) < 5000, f"an empty or unbounded message ({len(str(e))} characters)"
            assert listing(Path(d)) == before, "a failed read wrote something"
            return "clear"
        except Exception:  # noqa: BLE001 - counted, then the test fails on it
            return "traceback"
        s0, a0 = good_content()
        same = s == s0 and all(np.array_equal(arrays[k].view(np.uint8), a0[k].view(np.uint8)) for k in a0)
        return "unchanged" if raw == good_bytes() and same else "silent"


@st.composite
def mutated_files(draw) -> bytes:
    raw = bytearray(good_bytes())
    n = header_len()
    kind = draw(st.sampled_from(["flip header", "flip data", "truncate", "edit header", "append", "garbage"]))
    if kind == "flip header":
        for _ in range(draw(st.integers(1, 3))):
            raw[draw(st.integers(0, 8 + n - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "flip data":
        raw[draw(st.integers(8 + n, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif kind == "append":
        raw += draw(st.binary(min_size=1, max_size=16))
    elif kind == "garbage":
        return draw(st.binary(max_size=256))
    else:
        header, data = split(bytes(raw))
        meta = header["__metadata__"]
        names = [k for k in header if k != "__metadata__"]
        edit = draw(st.sampled_from(["spec char", "spec value", "shape", "dtype", "offset", "version", "drop key", "add key", "digest"]))
        if edit == "spec char":
            text = meta["spec"]
            i = draw(st.integers(0, len(text) - 1))
            meta["spec"] = text[:i] + draw(st.sampled_from(list("0123456789:.-&*[{ \nx"))) + text[i + 1:]
            if meta["spec"] == text:
                meta["spec"] += "\n"
        elif edit == "spec value":
            meta["spec"] = meta["spec"].replace("threshold: 0.99", f"threshold: {draw(st.floats(0.01, 0.98))}")
        elif edit == "shape":
            header[draw(st.sampled_from(names))]["shape"].append(1)
        elif edit == "dtype":
            header[draw(st.sampled_from(names))]["dtype"] = draw(st.sampled_from(["F64", "BF16", "I32", "F16", "X"]))
        elif edit == "offset":
            e = header[draw(st.sampled_from(names))]
            e["data_offsets"][draw(st.integers(0, 1))] += draw(st.sampled_from([-4, 4, 1]))
        elif edit == "version":
            meta["format_version"] = draw(st.sampled_from(["1", "3", "", "2 "]))
        elif edit == "drop key":
            del meta[draw(st.sampled_from(sorted(meta)))]
        elif edit == "add key":
            meta[draw(st.text(min_size=1, max_size=8))] = draw(st.text(max_size=8))
        else:
            digests = json.loads(meta["sha256"])
            k = draw(st.sampled_from(sorted(digests)))
            digests[k] = digests[k][::-1]
            meta["sha256"] = json.dumps(digests, sort_keys=True)
        raw = bytearray(join(header, data))
    return bytes(raw)


def run_read(raw: bytes) -> None:
    outcome = classify_read(raw)
    TALLY["file mutations"][outcome] += 1
    assert outcome in ("clear", "unchanged"), f"{outcome} for a file of {len(raw)} bytes"


@st.composite
def write_inputs(draw) -> tuple[dict, dict]:
    s = tiny()
    arrays = dict(arrays_of(s, "float32"))
    names = sorted(arrays)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(names))
        op = draw(st.sampled_from(["drop", "reshape", "dtype", "extra", "object"]))
        if op == "drop":
            arrays.pop(name, None)
        elif op == "reshape" and name in arrays:
            arrays[name] = arrays[name].reshape(-1)[:-1] if arrays[name].size > 1 else np.zeros(2, np.float32)
        elif op == "dtype" and name in arrays and arrays[name].dtype != object:
            arrays[name] = arrays[name].astype(draw(st.sampled_from([np.float64, np.int32, np.float16, ml_dtypes.bfloat16])))
        elif op == "extra":
            arrays[draw(st.text(max_size=10))] = np.zeros(1, np.float32)
        elif op == "object":
            arrays[name] = np.array([None, 1], dtype=object)
    return arrays, {}


def classify_write(arrays: dict) -> str:
    """'ok' (written and read back equal), 'clear' (BridgeError, nothing written), 'traceback', 'silent'
    (written although the arrays do not match the manifest, or read back different)."""
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "m.safetensors"
        try:
            wb.write_file(target, tiny(), arrays, "float32")
        except BridgeError:
            assert list(Path(d).iterdir()) == [], "a refused write left a file"
            return "clear"
        except Exception:  # noqa: BLE001
            return "traceback"
        ok = not ff.check_arrays(tiny(), arrays, "float32")
        _, back, _ = wb.read_file(target)
        same = back.keys() == arrays.keys() and all(np.array_equal(back[k], arrays[k]) for k in arrays)
        return "ok" if ok and same else "silent"


def run_write(arrays: dict) -> None:
    outcome = classify_write(arrays)
    TALLY["writes"][outcome] += 1
    assert outcome in ("ok", "clear"), outcome


FAST = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=2500, derandomize=False, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_fuzz_valid_file_still_loads():
    assert classify_read(good_bytes()) == "unchanged"
    assert classify_write(dict(arrays_of(tiny(), "float32"))) == "ok"


@FAST
@given(raw=mutated_files())
def test_fuzz_mutated_files(raw):
    run_read(raw)


@settings(FAST, max_examples=50)
@given(inputs=write_inputs())
def test_fuzz_writes(inputs):
    run_write(inputs[0])


@pytest.mark.slow
@SLOW
@given(raw=mutated_files())
def test_fuzz_mutated_files_large(raw):
    run_read(raw)


@pytest.mark.slow
@SLOW
@given(inputs=write_inputs())
def test_fuzz_writes_large(inputs):
    run_write(inputs[0])


@pytest.mark.slow
def test_fuzz_tally():
    """Prints the tally of the fuzz tests run before it in this session (run with -s)."""
    for name, c in TALLY.items():
        print(f"\nfuzz {name}: tried {sum(c.values())}, " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    assert all(c["traceback"] == c["silent"] == 0 for c in TALLY.values())
