"""spec.sharding: logical axes, partition, mesh and strategy parsing, per-device bytes and collectives, and
`mythos info --mesh` (docs/scaling.md). Framework-free: expected numbers are computed here from the manifest
shapes and the textbook formulas, not from the functions under test."""

import math
import re

import pytest
from typer.testing import CliRunner

import spec as S
from mythos.cli import _ib, app
from spec import sharding as SH

runner = CliRunner()
MESH = SH.parse_mesh("data=2,model=2,expert=2")

# every spec variation the presets allow, as overrides of tiny (and the openmythos semantics of a preset)
VARIATIONS = {
    "tiny": {},
    "mla": {"attention.type": "mla"},
    "dense": {"recurrent.ffn": "dense"},
    "no-shared-experts": {"moe.n_shared_experts": 0},
    "two-shared-experts": {"moe.n_shared_experts": 2},
    "components": {"recurrent.compressor.enabled": True, "recurrent.cross_loop_attention.enabled": True,
                   "recurrent.memory_gate.enabled": True, "value_head.enabled": True},
    "untied-mlp-halting-no-lora": {"tie_embeddings": False, "halting.head": "mlp", "recurrent.lora_rank": 0},
    "mlp-halting-width-dim": {"halting.head": "mlp", "halting.mlp_hidden": 32},
    "mla-dense-components": {"attention.type": "mla", "recurrent.ffn": "dense", "recurrent.compressor.enabled": True,
                             "value_head.enabled": True},
    "openmythos": {"semantics": "openmythos-0.5", "attention.type": "mla"},
}
SPECS = {**{name: S.preset(name) for name in S.preset_names()},
         **{f"tiny/{name}": S.load("tiny", overrides=o) for name, o in VARIATIONS.items()}}


def _allowed_sizes(s: S.Spec) -> dict[str, set[int]]:
    """What each logical axis may measure in this spec (from the schema fields, not from logical_axes)."""
    a, r, m = s.attention, s.recurrent, s.moe
    return {
        "vocab": {s.vocab_size}, "embed": {s.dim}, "expert": {m.n_experts}, "expert_mlp": {m.expert_dim},
        "mlp": {s.ffn_hidden, s.shared_expert_dim}, "loop": {r.max_loop_iters}, "rank": {r.lora_rank},
        "summaries": {r.compressor.n_summaries},
        "kv_heads": {a.n_kv_heads * s.head_dim} if a.type == "gqa" else set(),
        "heads": ({a.n_heads * s.head_dim} if a.type == "gqa" else
                  {a.n_heads * d for d in (a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim,
                                           a.qk_nope_head_dim + a.v_head_dim)}),
        "latent": {a.q_lora_rank, a.kv_lora_rank, a.kv_lora_rank + a.qk_rope_head_dim} if a.type == "mla" else set(),
    }


@pytest.mark.parametrize("name", SPECS)
def test_logical_axes_cover_every_manifest_tensor(name):
    s = SPECS[name]
    axes = SH.logical_axes(s)
    shapes = {p.path: p.shape for p in S.manifest(s)}
    assert list(axes) == list(shapes)  # every path, in manifest order, nothing extra
    sizes = _allowed_sizes(s)
    for path, shape in shapes.items():
        assert len(axes[path]) == len(shape), path
        for logical, size in zip(axes[path], shape):
            if logical is not None:
                assert size in sizes[logical], f"{path}: {logical} axis of size {size}, allowed {sizes[logical]}"
    assert any("embed" in a for a in axes.values())
    if s.recurrent.ffn == "moe":  # the router stays whole (each shard routes its own tokens over every expert)
        assert axes["recurrent.block.ffn.router.weight"] == (None, "embed")
        assert axes["recurrent.block.ffn.experts.gate"] == ("expert", "embed", "expert_mlp")


def _tp_ok(s: S.Spec, n: int) -> bool:
    a = s.attention
    widths = [s.ffn_hidden, a.n_heads] + ([a.n_kv_heads] if a.type == "gqa" else [])
    if s.recurrent.ffn == "moe" and s.moe.n_shared_experts:
        widths.append(s.shared_expert_dim)
    return all(w % n == 0 for w in widths)


@pytest.mark.parametrize("name", S.preset_names())
def test_every_preset_partitions_or_names_the_parameter(name):
    s = SPECS[name]
    paths = {p.path: p.shape for p in S.manifest(s)}
    for strategy in SH.strategies_for(MESH):
        expect_ok = ((s.dim % 2 == 0 or "fsdp" not in strategy) and _tp_ok(s, 2)
                     and s.recurrent.ffn == "moe" and s.moe.n_experts % 2 == 0)
        if not expect_ok:
            with pytest.raises(S.SpecError) as e:
                SH.partition(s, MESH, strategy)
            path = str(e.value).split(":", 1)[0]
            assert path in paths and "not divisible by mesh axis" in str(e.value), str(e.value)
            continue
        place = SH.partition(s, MESH, strategy)
        assert set(place) == set(paths)
        for path, axes in place.items():
            assert len(axes) == len(paths[path])
            for axis, size in zip(axes, paths[path]):
                assert axis is None or size % MESH[axis] == 0, (path, axis, size)
        assert place["recurrent.block.ffn.experts.up"][0] == "expert"  # ep splits the expert stacks
        assert place["recurrent.block.attn.wo.weight"][1] == "model"  # tp: row-parallel wo
        if "fsdp" in strategy:
            assert place["embed.weight"] == (None, "data")
        else:
            assert all("data" not in axes for axes in place.values())  # dp replicates every tensor


def test_the_presets_that_tp_cannot_split_are_the_odd_hidden_widths():
    bad = sorted(n for n in S.preset_names() if not _tp_ok(S.preset(n), 2))
    assert bad == ["bench-s-gqa", "bench-s-mla", "openmythos-10b", "openmythos-1t"]  # ffn_hidden 341, 5461, 21845
    assert all(S.preset(n).ffn_hidden % 2 for n in bad)


def test_partition_error_names_parameter_axis_and_both_sizes():
    s = S.preset("tiny")
    with pytest.raises(S.SpecError, match=r"prelude\.0\.attn\.wk\.weight: dimension 0 \(kv_heads, 2 kv heads\) "
                                          r"is not divisible by mesh axis model=4"):
        SH.partition(s, {"model": 4}, ("tp",))
    with pytest.raises(S.SpecError, match=r"prelude\.0\.ffn\.gate\.weight: dimension 0 \(mlp, 42 elements\) is not "
                                          r"divisible by mesh axis model=4"):
        SH.partition(S.load("tiny", overrides={"attention.n_kv_heads": 4}), {"model": 4}, ("tp",))
    with pytest.raises(S.SpecError, match=r"recurrent\.block\.ffn\.experts\.gate: dimension 0 \(expert, 4 elements\) "
                                          r"is not divisible by mesh axis expert=8"):
        SH.partition(s, {"expert": 8}, ("ep",))
    with pytest.raises(S.SpecError, match="strategy ep needs a MoE loop FFN"):
        SH.partition(S.load("tiny", overrides={"recurrent.ffn": "dense"}), {"expert": 2}, ("ep",))


@pytest.mark.parametrize("text,message", [
    ("gpu=2", "unknown axis 'gpu'; allowed: data, model, expert"),
    ("data=2,data=4", "axis 'data' given twice"),
    ("data=0", "data=0 must be at least 1"),
    ("data:2", "expected axis=size pairs"),
    ("", "expected axis=size pairs"),
    ("data=-1", "expected axis=size pairs"),
])
def test_parse_mesh_errors(text, message):
    with pytest.raises(S.SpecError, match=re.escape(message)):
        SH.parse_mesh(text)


@pytest.mark.parametrize("mesh,text,message", [
    ("data=2", "dp+fsdp", "dp and fsdp both use the data axis"),
    ("data=2", "zero3", "unknown strategy 'zero3'; allowed: dp, fsdp, tp, ep"),
    ("data=2", "dp+dp", "a strategy is named twice"),
    ("data=2,expert=4", "dp", "mesh axis expert=4 is used by no strategy in dp; the expert axis is used by ep"),
    ("data=2", "dp+tp", "strategy tp needs mesh axis 'model'; the mesh has data=2"),
    ("model=2", "ep", "strategy ep needs mesh axis 'expert'"),
])
def test_parse_strategy_errors(mesh, text, message):
    with pytest.raises(S.SpecError, match=re.escape(message)):
        SH.parse_strategy(text, SH.parse_mesh(mesh))


def test_parse_mesh_and_strategy():
    mesh = SH.parse_mesh("expert=4, data=2")
    assert list(mesh.items()) == [("expert", 4), ("data", 2)]  # order kept
    assert SH.parse_strategy(None, mesh) == ("dp", "ep") and SH.parse_strategy("ep+fsdp", mesh) == ("fsdp", "ep")
    assert SH.strategies_for(MESH) == [("dp", "tp", "ep"), ("fsdp", "tp", "ep")]
    assert SH.batch_axes(mesh, ("fsdp", "ep")) == ("data", "expert") and SH.batch_axes(MESH, ("tp",)) == ()


# ---- per-device bytes of tiny, by hand ----

TINY = S.preset("tiny")
NUMEL = {p.path: p.numel for p in S.manifest(TINY)}
TOTAL = sum(NUMEL.values())
BUFFER = "recurrent.block.ffn.router_bias"
# the tiny tensors without an embed (model width) axis: all that fsdp leaves whole
NO_EMBED = {"recurrent.lora.scale", "recurrent.injection.log_dt", "recurrent.act.halt.bias", BUFFER}
EXPERTS = {f"recurrent.block.ffn.experts.{w}" for w in ("gate", "up", "down")}
# tp's tensors: attention projections (heads, kv heads) and the SwiGLU hidden of prelude, coda, shared expert
TP = ({f"{b}.attn.{w}.weight" for b in ("prelude.0", "recurrent.block", "coda.0") for w in ("wq", "wk", "wv", "wo")}
      | {f"{b}.{w}.weight" for b in ("prelude.0.ffn", "coda.0.ffn", "recurrent.block.ffn.shared_experts.0")
         for w in ("gate", "up", "down")})
KV = 2 * 6 * 8 * 16 * 2 * 8  # k and v, (L = 1 + 4 + 1, B = 8, S = 16, H_kv = 2, K = 8) values


def _bytes(split: dict[str, int], b: int = 4) -> tuple[int, int]:
    """(params, AdamW state) bytes when tensor p is cut into split.get(p, 1) pieces, b bytes per value."""
    params = sum(n // split.get(p, 1) * (b if p != BUFFER else 4) for p, n in NUMEL.items())
    optim = sum(n // split.get(p, 1) * (8 + (4 if b < 4 else 0)) for p, n in NUMEL.items() if p != BUFFER)
    return params, optim


@pytest.mark.parametrize("mesh,strategy,split,kv_pieces", [
    ("data=2", "dp", {}, 2),
    ("data=2", "fsdp", {p: 2 for p in NUMEL if p not in NO_EMBED}, 2),
    ("expert=4", "ep", {p: 4 for p in EXPERTS}, 4),
    ("model=2", "tp", {p: 2 for p in TP}, 2),  # tp: the batch stays whole, the 2 kv heads split
    ("data=2,expert=2", "fsdp+ep", {p: 2 * (2 if p in EXPERTS else 1) for p in NUMEL if p not in NO_EMBED}, 4),
    ("data=2,model=2,expert=2", None, {**{p: 2 for p in TP}, **{p: 2 for p in EXPERTS}}, 8),
])
def test_per_device_bytes_of_tiny(mesh, strategy, split, kv_pieces):
    got = SH.per_device_bytes(TINY, mesh, strategy, batch=8, seq_len=16)
    params, optim = _bytes(split)
    assert got == {"params": params, "optimizer": optim, "kv_cache": KV * 4 // kv_pieces,
                   "total": params + optim + KV * 4 // kv_pieces}


def test_per_device_bytes_one_device_and_dtypes():
    one = SH.per_device_bytes(TINY, "data=1", "dp", batch=8, seq_len=16)
    assert one["params"] == 4 * TOTAL and one["optimizer"] == 8 * (TOTAL - NUMEL[BUFFER])
    bf16 = SH.per_device_bytes(TINY, "data=2", "fsdp", batch=8, seq_len=16, dtype="bfloat16")
    params, optim = _bytes({p: 2 for p in NUMEL if p not in NO_EMBED}, b=2)
    assert (bf16["params"], bf16["optimizer"], bf16["kv_cache"]) == (params, optim, KV * 2 // 2)  # + master copy
    f64 = SH.per_device_bytes(TINY, "data=2", "dp", batch=8, seq_len=16, dtype="float64", optimizer="none")
    assert (f64["params"], f64["optimizer"]) == (8 * TOTAL, 0)
    loops = SH.per_device_bytes(TINY, "data=2", "dp", batch=8, seq_len=16, n_loops=10)
    assert loops["kv_cache"] == KV // 6 * 12 * 4 // 2  # 1 + 10 + 1 attention layers


def test_per_device_bytes_mla_latent_cache_is_not_split_by_tp():
    s = S.load("tiny", overrides={"attention.type": "mla"})
    got = SH.per_device_bytes(s, "data=2,model=2", "dp+tp", batch=8, seq_len=16)
    a = s.attention
    assert got["kv_cache"] == 6 * 8 * 16 * (a.kv_lora_rank + a.qk_rope_head_dim) * 4 // 2  # batch split only
    comp = S.load("tiny", overrides={"recurrent.compressor.enabled": True, "recurrent.compressor.chunk": 4})
    got = SH.per_device_bytes(comp, "data=2", "dp", batch=8, seq_len=16)
    summaries = 4 * 8 * (16 // 4) * 2 * 32 + 4 * 8 * 4 * 32  # (N, B, S / c, m, D) and (N, B, c, D)
    assert got["kv_cache"] == (KV + summaries) * 4 // 2


@pytest.mark.parametrize("kwargs,message", [
    ({"batch": 3}, "batch 3 is not divisible by the 2 batch shards of mesh data=2"),
    ({"batch": 0}, "batch=0 must be a whole number >= 1"),
    ({"batch": 8, "dtype": "int8"}, "dtype 'int8' is not allowed; allowed: float64, float32, bfloat16, float16"),
    ({"batch": 8, "optimizer": "sgd"}, "optimizer 'sgd' is not allowed; allowed: adamw, none"),
    ({"batch": 8, "seq_len": 65}, "seq_len"),
    ({"batch": 8, "n_loops": 0}, "n_loops"),
])
def test_per_device_bytes_errors(kwargs, message):
    kwargs = {"seq_len": 16, **kwargs}
    with pytest.raises(S.SpecError, match=re.escape(message)):
        SH.per_device_bytes(TINY, "data=2", "dp", **kwargs)


# ---- collectives per loop step of tiny, by hand ----

def _forward_counts(rows: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        if r.phase == "forward":
            out[r.kind] = out.get(r.kind, 0) + r.count
    return out


def test_collectives_per_step_of_tiny():
    A = 4 * 16 * 32 * 4  # (B_l = 8 / 2, T = 16, D = 32) float32
    dp = SH.collectives_per_step(TINY, "data=2", "dp", batch=8, seq_len=16)
    assert _forward_counts(dp) == {"all-reduce": 1}  # only ACT's flag
    grads = [r for r in dp if r.phase == "training step" and "gradients" in r.what]
    assert [(r.kind, r.count, r.bytes) for r in grads] == [("all-reduce", 1, 2 * 1 * 4 * (TOTAL - NUMEL[BUFFER]) // 2)]

    tp = SH.collectives_per_step(TINY, "data=2,model=2", "dp+tp", batch=8, seq_len=16)
    fwd = [r for r in tp if r.phase == "forward" and r.strategy == "tp"]
    assert [(r.kind, r.count, r.bytes) for r in fwd] == [("all-reduce", 2, 2 * (2 * 1 * A // 2))]
    alone = SH.collectives_per_step(TINY, "model=2", "tp", batch=8, seq_len=16)
    assert _forward_counts(alone) == {"all-reduce": 2}  # the batch is not split: no ACT flag

    ep = SH.collectives_per_step(TINY, "expert=4", "ep", batch=8, seq_len=16)
    assert _forward_counts(ep) == {"all-to-all": 2, "all-reduce": 1}
    rows = 8 // 4 * 16 * 2  # B_l T k rows, 16 for each of the 4 expert shards
    a2a = [r.bytes for r in ep if r.kind == "all-to-all" and r.phase == "forward"]
    assert a2a == [3 * rows * 32 * 4 // 4] * 2
    roomy = SH.collectives_per_step(TINY, "expert=4", "ep", batch=8, seq_len=16, capacity_factor=4)
    assert [r.bytes for r in roomy if r.kind == "all-to-all" and r.phase == "forward"] == [3 * rows * 32 * 4] * 2

    fsdp = SH.collectives_per_step(TINY, "data=2", "fsdp", batch=8, seq_len=16)
    loop = sum(n for p, n in NUMEL.items() if p.startswith("recurrent.") and p not in NO_EMBED) * 4 // 2
    by = {(r.phase, r.kind): r.bytes for r in fsdp if r.strategy == "fsdp" and "loop block" in r.what}
    assert by == {("forward", "all-gather"): loop, ("backward", "all-gather"): loop,
                  ("backward", "reduce-scatter"): loop}
    whole = [r for r in fsdp if r.phase == "training step" and "gradients of 3 tensors" in r.what]
    assert [r.bytes for r in whole] == [4 * (16 + 1 + 1)]  # lora.scale, log_dt, halt bias: all-reduced

    for r in dp + tp + ep + fsdp:
        assert r.kind in SH.COLLECTIVES and r.phase in SH.PHASES and r.count >= 1 and r.bytes >= 0


def test_collectives_need_a_usable_strategy():
    with pytest.raises(S.SpecError, match="not divisible by mesh axis model=2"):
        SH.collectives_per_step(S.preset("bench-s-gqa"), "model=2", "tp", batch=2, seq_len=16)
    with pytest.raises(S.SpecError, match="capacity_factor=0"):
        SH.collectives_per_step(TINY, "expert=2", "ep", batch=2, seq_len=16, capacity_factor=0)


# ---- mythos info --mesh ----

def test_info_mesh_prints_every_strategy():
    r = runner.invoke(app, ["info", "tiny", "--mesh", "data=2,expert=2", "--batch", "8", "--seq", "16"])
    assert r.exit_code == 0, r.output
    assert "per device on mesh data=2,expert=2 (4 devices)" in r.output
    for strategy in ("dp+ep", "fsdp+ep"):
        mem = SH.per_device_bytes(TINY, "data=2,expert=2", strategy, batch=8, seq_len=16)
        line = next(x for x in r.output.splitlines() if x.startswith(f"│ {strategy} "))
        assert all(_ib(mem[k]) in line for k in ("params", "optimizer", "kv_cache", "total")), line
        assert f"collectives of {strategy}" in r.output
    assert "all-to-all" in r.output and "dispatch" in r.output


def test_info_mesh_one_strategy_and_refusals():
    r = runner.invoke(app, ["info", "tiny", "--mesh", "data=2,expert=2", "--strategy", "dp+ep"])
    assert r.exit_code == 0, r.output
    assert "dp+ep" in r.output and "fsdp+ep" not in r.output
    r = runner.invoke(app, ["info", "bench-s-gqa", "--mesh", "data=2,model=2"])
    assert r.exit_code == 0, r.output  # the spec cannot use tp: a row saying why, not a traceback
    assert "cannot use" in r.output and "prelude.0.ffn.gate.weight:" in r.output and "341" in r.output
    r = runner.invoke(app, ["info", "tiny", "--mesh", "data=2", "--batch", "3"])
    assert r.exit_code == 0 and "batch 3 is not divisible" in " ".join(r.output.split())


@pytest.mark.parametrize("args,message", [
    (["--mesh", "gpu=2"], "unknown axis 'gpu'"),
    (["--mesh", "data=0"], "data=0 must be at least 1"),
    (["--mesh", "data=2", "--strategy", "tp"], "strategy tp needs mesh axis 'model'"),
    (["--mesh", "data=2,expert=2", "--strategy", "dp"], "mesh axis expert=2 is used by no strategy"),
    (["--strategy", "dp"], "give --mesh too"),
])
def test_info_bad_mesh_exits_2(args, message):
    r = runner.invoke(app, ["info", "tiny", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert "per device on mesh" not in r.output and "parameters (" not in r.output  # refused before any table
