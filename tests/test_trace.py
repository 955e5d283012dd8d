"""`mythos trace` (mythos/trace.py and the CLI command): both twins' traces as JSON and PNGs."""

import dataclasses
import json
from typing import NamedTuple

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mythos_jax
import mythos_torch
import spec as S
from mythos import trace as tr
from mythos.cli import app

runner = CliRunner()
TINY = ["vocab_size=258"]  # tiny's 64-id vocabulary cannot hold the byte tokenizer (256 bytes + BOS + EOS)
PROMPT = "hé!"  # a two-byte character: BOS + 4 bytes
IDS = [256, 104, 195, 169, 33]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """Both twins traced on tiny in float64, written to their own folders: {backend: (result, folder, written, notes)}."""
    out = {}
    for backend in tr.BACKENDS:
        r = tr.run_trace("tiny", backend, PROMPT, dtype="float64", sets=TINY)
        folder = tmp_path_factory.mktemp(f"trace-{backend}")
        written, notes = tr.write_all(r, folder)
        out[backend] = (r, folder, written, notes)
    return out


def load(folder) -> dict:
    return json.loads((folder / tr.JSON_NAME).read_text(encoding="utf-8"))


def assert_same_arrays(a: dict, b: dict, tol: float) -> None:
    """Same keys, shapes, dtypes; bool/int equal, floats within tol with infinities at the same places."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.shape == y.shape and x.dtype == y.dtype, (k, x.shape, y.shape, x.dtype, y.dtype)
        if x.dtype.kind in "biu":
            np.testing.assert_array_equal(x, y, err_msg=k)
        else:
            assert np.array_equal(np.isinf(x), np.isinf(y)), k
            fin = np.isfinite(x)
            err = np.abs(x[fin] - y[fin])
            print(f"{k}: max {err.max(initial=0):.2e} mean {err.mean() if err.size else 0:.2e}")
            assert err.max(initial=0) <= tol, (k, err.max())


def test_both_backends_write_the_same_keys_shapes_and_dtypes(traced):
    jt, jj = load(traced["torch"][1]), load(traced["jax"][1])
    assert jt.keys() == jj.keys()
    assert jt["traces"].keys() == jj["traces"].keys()
    assert jt["shapes"] == jj["shapes"] and jt["dtypes"] == jj["dtypes"]
    assert (jt["backend"], jj["backend"]) == ("torch", "jax")
    for d in (jt, jj):
        assert d["dtype"] == "float64" and d["spec"] == "tiny (vocab_size=258)"
        assert d["ids"] == [IDS] and d["tokens"] == ["<bos>", "h", "é", "…", "!"]
        assert d["shapes"]["loop_counts"] == [1, 5] and d["shapes"]["halted"] == [1, 5] and d["shapes"]["n_steps"] == []
        assert d["shapes"]["traces.cum_p"] == [4, 1, 5] and d["shapes"]["traces.expert_idx"] == [4, 1, 5, 2]
        assert d["dtypes"]["traces.cum_p"] == "float64" and d["dtypes"]["traces.running"] == "bool"
        assert d["dtypes"]["traces.expert_idx"] == "int32" and d["dtypes"]["n_steps"] == "int32"


def test_float64_traces_agree_across_backends(traced):
    """Same spec, seed and weights: the same traces (1e-10), loop counts, halting and experts."""
    rt, rj = tr.read_json(traced["torch"][1] / tr.JSON_NAME), tr.read_json(traced["jax"][1] / tr.JSON_NAME)
    assert_same_arrays(rt.traces, rj.traces, 1e-10)
    assert_same_arrays(rt.outputs, rj.outputs, 0)
    np.testing.assert_array_equal(rt.ids, rj.ids)


def test_json_holds_every_traces_field_of_an_independent_forward(traced):
    """The dump is the model's output: every non-None field, bit for bit (torch forward run here)."""
    r = traced["torch"][0]
    model = mythos_torch.build(S.load("tiny", overrides={"vocab_size": 258}), seed=0, dtype="float64")
    with torch.inference_mode():
        out = mythos_torch.forward(model, torch.tensor([IDS]))
    fields = {k: v for k, v in zip(out.traces._fields, out.traces) if v is not None}
    assert set(load(traced["torch"][1])["traces"]) == set(fields)
    for backend in tr.BACKENDS:  # without --attention: no attention field, even if a twin returned one
        assert not [k for k in load(traced[backend][1])["traces"] if tr.is_attention_field(k)]
    for k, v in fields.items():
        assert np.array_equal(tr.read_json(traced["torch"][1] / tr.JSON_NAME).traces[k], v.numpy()), k
    np.testing.assert_array_equal(r.loop_counts, out.loop_counts[0].numpy())
    assert r.n_steps == out.n_steps


def test_json_is_strict_and_round_trips_infinities(traced, tmp_path):
    r, folder, _, _ = traced["torch"]
    text = (folder / tr.JSON_NAME).read_text(encoding="utf-8")
    # strict: a NaN/Infinity literal would reach parse_constant
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    margin = np.asarray(tr._decode(d["traces"]["router_margin"]), dtype=np.float64)
    np.testing.assert_array_equal(margin, r.traces["router_margin"])
    # crafted non-finite values: encoded as strings, read back exactly
    odd = dataclasses.replace(r, traces={**r.traces, "router_margin": np.array([[[1.5, np.inf, -np.inf, np.nan]]])})
    path = tr.write_json(odd, tmp_path / "odd.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["traces"]["router_margin"] == [[[1.5, "inf", "-inf", "nan"]]]
    back = tr.read_json(path).traces["router_margin"]
    assert back[0, 0, 0] == 1.5 and back[0, 0, 1] == np.inf and back[0, 0, 2] == -np.inf and np.isnan(back[0, 0, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.json"]  # no temp file left behind


def test_loop_counts_follow_the_traced_act_rule(traced):
    """From the dumped traces alone: a position runs exactly loop-count steps and halts when c crosses the threshold."""
    r = traced["jax"][0]
    running, c = r.traces["running"][:, 0], r.traces["cum_p"][:, 0]  # (N, T)
    np.testing.assert_array_equal(running.sum(0), r.loop_counts)
    th, N = r.halting_threshold, r.n_loops
    for i, n in enumerate(r.loop_counts):
        assert n == N or c[n - 1, i] >= th
        assert n == 1 or c[n - 2, i] < th
    assert r.n_steps == r.loop_counts.max()


def test_expert_counts_cover_every_running_slot(traced):
    r = traced["torch"][0]
    counts = tr.expert_counts(r)
    k = r.traces["expert_idx"].shape[-1]
    assert counts.shape == (4, r.n_steps) and counts.dtype.kind == "i"
    np.testing.assert_array_equal(counts.sum(0), r.traces["running"][: r.n_steps, 0].sum(1) * k)
    np.testing.assert_array_equal(counts, tr.expert_counts(traced["jax"][0]))


def test_pngs_are_valid_images(traced):
    import matplotlib.image as mpimg

    for backend in tr.BACKENDS:
        _, folder, written, notes = traced[backend]
        assert notes == []  # tiny's looped FFN is a MoE: all three pictures
        names = {p.name for p, _ in written}
        assert names == {tr.JSON_NAME, *tr.PNG_NAMES.values()}
        assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # nothing else, no temp files
        for name in tr.PNG_NAMES.values():
            data = (folder / name).read_bytes()
            assert data[:8] == PNG_SIGNATURE and len(data) > 1000
            img = mpimg.imread(folder / name)
            assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300
            assert img[..., :3].std() > 0.05  # something drawn, not a blank canvas


def test_extra_fields_are_dumped_generically(traced, tmp_path):
    """Fields added to ModelOutput/Traces appear by name; None fields are skipped; attention only when asked."""
    class Traces(NamedTuple):
        cum_p: np.ndarray
        value: np.ndarray
        attn_probs: np.ndarray
        off: None

    class ModelOutput(NamedTuple):
        logits: np.ndarray
        loop_counts: np.ndarray
        values: np.ndarray
        traces: Traces
        cache: None = None

    t = Traces(np.zeros((2, 1, 3)), np.ones((2, 1, 3)), np.full((2, 1, 2, 3, 3), 1 / 3), None)
    out = ModelOutput(np.zeros((1, 3, 8)), np.array([[1, 2, 2]], np.int32), np.arange(3.0)[None], t)
    outputs, traces = tr.collect(out)
    assert list(outputs) == ["loop_counts", "values"] and list(traces) == ["cum_p", "value"]
    assert "attn_probs" in tr.collect(out, attention=True)[1]

    r = dataclasses.replace(traced["jax"][0], traces={**traced["jax"][0].traces, "value": np.ones((4, 1, 5))},
                            outputs={**traced["jax"][0].outputs, "values": np.arange(5.0)[None]})
    d = tr.to_json(r)
    assert d["traces"]["value"] == np.ones((4, 1, 5)).tolist() and d["values"] == [[0.0, 1.0, 2.0, 3.0, 4.0]]
    back = tr.read_json(tr.write_json(r, tmp_path / "t.json"))
    np.testing.assert_array_equal(back.outputs["values"], np.arange(5.0)[None])
    assert back.traces["value"].shape == (4, 1, 5)


def test_cli_jax_matches_torch_and_prints_the_summary(traced, tmp_path):
    out = tmp_path / "jax"
    r = runner.invoke(app, ["trace", "tiny", "--backend", "jax", "--prompt", PROMPT, "--dtype", "float64",
                            "--set", "vocab_size=258", "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = flat(r.output)
    for name in (tr.JSON_NAME, *tr.PNG_NAMES.values()):
        assert (out / name).is_file() and name in text
    assert "loop count per token" in text and "<bos>" in text and "halting" in text
    assert_same_arrays(tr.read_json(out / tr.JSON_NAME).traces, traced["torch"][0].traces, 1e-10)


def test_cli_dense_ffn_skips_the_expert_picture(tmp_path):
    out = tmp_path / "dense"
    out.mkdir()
    (out / "experts.png").write_bytes(b"an earlier MoE run's picture")  # would contradict this trace
    r = runner.invoke(app, ["trace", "tiny", "--prompt", "ab", "--n-loops", "3", "--set", "vocab_size=258",
                            "--set", "recurrent.ffn=dense", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "FFN is dense" in flat(r.output) and "removed the stale experts.png" in flat(r.output)
    assert sorted(p.name for p in out.iterdir()) == ["halting.png", "state_norms.png", "trace.json"]
    d = load(out)
    assert d["shapes"]["traces.expert_idx"] == [3, 1, 3, 0] and d["n_experts"] == 0 and d["dtype"] == "float32"
    assert {v for step in d["traces"]["router_margin"] for row in step for v in row} == {"inf"}  # dense: +inf


def test_cli_traces_a_weights_file(tmp_path):
    import weights_bridge as wb

    s = S.load("tiny", overrides={"vocab_size": 258})
    path = wb.save(mythos_torch.build(s, seed=3, dtype="float64"), tmp_path / "m.safetensors")
    out = tmp_path / "w"
    r = runner.invoke(app, ["trace", str(path), "--prompt", PROMPT, "--out", str(out)])
    assert r.exit_code == 0, r.output
    got = tr.read_json(out / tr.JSON_NAME)
    assert got.seed is None and got.dtype == "float64" and got.spec_name == str(path)
    want = tr.run_trace("tiny", "torch", PROMPT, dtype="float64", seed=3, sets=TINY)
    assert_same_arrays(got.traces, want.traces, 0)


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "'nosuch' is neither a preset"),
    (["tiny", "--set", "vocab_size=258", "--backend", "mxnet"], "--backend 'mxnet' is not allowed; allowed: torch, jax"),
    (["tiny"], "vocab_size=64 is too small for the byte tokenizer"),
    (["tiny", "--set", "vocab_size=258", "--dtype", "float16"], "--dtype 'float16' is not allowed"),
    (["tiny", "--set", "vocab_size=258", "--prompt", "x" * 64], "more than the spec's max_seq_len=64"),
    (["missing.safetensors"], "weights file 'missing.safetensors' does not exist"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    r = runner.invoke(app, ["trace", *args, "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert message in flat(r.output)
    assert not out.exists()


@pytest.mark.parametrize("backend", tr.BACKENDS)
def test_attention_flag(tmp_path, backend):
    """--attention: a clear error while a twin lacks attn_probs; with it, the probabilities are dumped."""
    twin = {"torch": mythos_torch, "jax": mythos_jax}[backend]
    out = tmp_path / "att"
    args = ["trace", "tiny", "--set", "vocab_size=258", "--prompt", "ab", "--backend", backend, "--attention",
            "--out", str(out)]
    r = runner.invoke(app, args)
    if not tr.supports_attention(twin):
        assert r.exit_code == 2, r.output
        assert f"--attention needs `mythos_{backend}.forward(..., attn_probs=True)`" in flat(r.output)
        assert not out.exists()
    else:
        assert r.exit_code == 0, r.output
        d = load(out)
        att = [k for k in d["traces"] if tr.is_attention_field(k)]
        assert att, f"--attention wrote no attention field: {list(d['traces'])}"
        for k in att:  # (N, B, ..., T, S): rows of probabilities over the 3 key positions
            p = np.asarray(tr._decode(d["traces"][k]), dtype=np.float64)
            assert p.shape[:2] == (4, 1) and p.shape[-1] == 3 and np.all(p >= 0)
            np.testing.assert_allclose(p[: d["n_steps"]].sum(-1), 1.0, atol=1e-5)  # steps run: distributions
