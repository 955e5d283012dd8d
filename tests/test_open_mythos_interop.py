"""open-mythos 0.5.0 -> Mythos: imported weights give open-mythos' own logits and halting steps.

The reference is open-mythos itself (its model, its forward, its ACT probabilities read through a
forward hook), so these are golden numbers from an independent source (STYLE 15). Nothing is
downloaded: the models are built here, small, from torch.manual_seed.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import yaml

import mythos_jax as mj
import mythos_torch as mt
import spec
import weights_bridge as wb
from helpers import report
from reference import act_reference
from weights_bridge import convert as cli, openmythos as om
from weights_bridge.fileformat import BridgeError

# without open-mythos the whole module is one skip with this reason, not a collection error
pytest.importorskip("open_mythos", reason="open-mythos 0.5.0 is not installed (pip install open-mythos==0.5.0)")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from open_mythos import main as om_main
    from open_mythos import variants
    from open_mythos.main import MythosConfig, OpenMythos

pytestmark = pytest.mark.interop

N_LOOPS = {  # 10 > max_loop_iters=6: depth extrapolation (LoRA scale clamped)
    "torch": (1, 3, 5, 8, 10),
    "jax": (10,),  # each n_loops is one XLA compile (~2 s); 10 has every halting step, unhalted positions too
}
IDS_SHAPE = (2, 16)  # one shape everywhere, so compiled JAX forwards are reused across tests
# float32: the tolerance transformers settled on for cross-framework logits (PARITY-NOTES).
F32_TOL = 1e-5
# float64: open-mythos rotates RoPE in float32 even after .double() (x.float() in apply_rope), so a
# one-ulp float32 difference in a rotated q/k element (~6e-8 relative) is the floor, and it moves
# logits by ~1e-11..1e-10 here. Two sources, both measured: its RoPE table is torch's float32 pow
# while ours is NumPy's (8e-8 apart in this config; with its table swapped for ours the GQA torch
# twin agrees to 1e-16), and its complex64 multiply rounds differently from the real formula on some
# vectorised paths (MLA's rotated q/k differ by 1 ulp; 1.3e-11 in logits even with the same table).
# Measured max over every case below: 8.9e-11. The bound leaves ~10x headroom, 10^4 below float32's.
F64_TOL = 1e-9


def small_config(attn: str, **changes) -> MythosConfig:
    fields = dict(vocab_size=96, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=32, max_loop_iters=6,
                  prelude_layers=1, coda_layers=1, attn_type=attn, n_experts=8, n_shared_experts=1,
                  n_experts_per_tok=2, expert_dim=24, lora_rank=4, q_lora_rank=16, kv_lora_rank=16,
                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    return MythosConfig(**{**fields, **changes})


def open_mythos_model(cfg: MythosConfig, seed: int = 0) -> OpenMythos:
    """A seeded open-mythos model whose ACT halts at varied steps (some positions not by step 8)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-size init warnings when lora_rank=0
        model = OpenMythos(cfg).eval()
    with torch.no_grad():  # at random init every position halts by step 2-3; spread it out
        model.recurrent.act.halt.bias.fill_(-2.5)
        model.recurrent.act.halt.weight.mul_(5.0 if cfg.attn_type == "gqa" else 10.0)
    return model


def reference(model: OpenMythos, ids: torch.Tensor, n_loops: int):
    """open-mythos' logits, and the halting steps its ACT implies, recomputed from its own p."""
    ps: list[torch.Tensor] = []
    hook = model.recurrent.act.register_forward_hook(lambda mod, args, out: ps.append(out.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(ids, n_loops=n_loops)
    finally:
        hook.remove()
    # open-mythos' rule: cum += p while running; a position halts once cum >= threshold; its
    # weights stop at that step. Steps are 1-based; a position that never halts ran all n_loops.
    thr = model.cfg.act_threshold
    cum = torch.zeros(ps[0].shape, dtype=ps[0].dtype)
    halted = torch.zeros(ps[0].shape, dtype=torch.bool)
    steps = torch.full(ps[0].shape, n_loops, dtype=torch.int64)
    for t, p in enumerate(ps):
        running = ~halted
        cum = cum + p * running
        newly = running & (cum >= thr)
        steps[newly] = t + 1
        halted |= newly
    return logits.double().numpy(), steps.numpy(), halted.numpy(), torch.stack(ps).double().numpy()


def ours(backend: str, model: object, ids: torch.Tensor, n_loops: int):
    if backend == "torch":
        with torch.no_grad():
            out = model(ids, n_loops)
        return (out.logits.double().numpy(), out.loop_counts.numpy(), out.halted.numpy(), int(out.n_steps),
                out.traces.halt_p.double().numpy())
    out = mj.forward(model, ids.numpy(), n_loops)
    return (np.asarray(out.logits, np.float64), np.asarray(out.loop_counts), np.asarray(out.halted),
            int(out.n_steps), np.asarray(out.traces.halt_p, np.float64))


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_logits_and_halting_match_open_mythos(attn, precision):
    cfg = small_config(attn)
    model = open_mythos_model(cfg)
    if precision == "float64":
        model = model.double()
    ids = torch.randint(0, cfg.vocab_size, IDS_SHAPE, generator=torch.Generator().manual_seed(1))
    tol = F32_TOL if precision == "float32" else F64_TOL
    spread = set()
    for backend in ("torch", "jax"):
        s, ours_model = wb.from_open_mythos(model, cfg, backend=backend)
        assert s.semantics == "openmythos-0.5"
        for n in N_LOOPS[backend]:
            ref_logits, ref_steps, ref_halted, ref_p = reference(model, ids, n)
            logits, counts, halted, n_steps, halt_p = ours(backend, ours_model, ids, n)
            assert logits.dtype == np.float64 and ref_logits.shape == logits.shape
            err = np.abs(logits - ref_logits)
            print(f"{attn} {precision} {backend} n_loops={n}: max |dlogit| {err.max():.3e}, mean {err.mean():.3e}, "
                  f"steps {np.bincount(counts.ravel(), minlength=n + 1)[1:].tolist()}")
            assert err.max() <= tol, f"{backend} n_loops={n}: max |dlogit| {err.max():.3e} > {tol}"
            np.testing.assert_array_equal(counts, ref_steps)
            np.testing.assert_array_equal(halted, ref_halted)
            assert n_steps == len(ref_p)  # open-mythos stops once every position halted; so do we
            np.testing.assert_allclose(halt_p[:n_steps], ref_p, rtol=0, atol=tol)
            spread |= set(counts.ravel().tolist())
    assert len(spread) >= 4, f"halting steps not varied enough to test ACT: {sorted(spread)}"


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_weights_keep_their_dtype_bit_for_bit(backend):
    cfg = small_config("mla")
    for convert, dtype in [(lambda m: m, "float32"), (lambda m: m.double(), "float64"), (lambda m: m.bfloat16(), "bfloat16")]:
        model = convert(open_mythos_model(cfg))
        _, ours_model = wb.from_open_mythos(model.state_dict(), cfg, backend=backend)
        arrays = (mt if backend == "torch" else mj).dump_arrays(ours_model)
        assert arrays["embed.weight"].dtype.name == dtype
        back = om.arrays_to_open_mythos(arrays, wb.spec_from_config(cfg))
        for name, t in model.state_dict().items():
            if name in om.DERIVED:
                continue
            np.testing.assert_array_equal(back[name].view(np.uint8), om.to_numpy(t).view(np.uint8), err_msg=name)


def test_to_open_mythos_round_trip():
    cfg = small_config("gqa")
    model = open_mythos_model(cfg, seed=2)
    _, ours_model = wb.from_open_mythos(model, backend="torch")
    sd = wb.to_open_mythos(ours_model)
    rebuilt = OpenMythos(MythosConfig(**wb.config_from_spec(ours_model.spec))).eval()
    rebuilt.load_state_dict(sd, strict=True)
    assert rebuilt.head.weight is rebuilt.embed.weight
    for name, t in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], t), name  # RoPE buffers included
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids, n_loops=4), model(ids, n_loops=4))


def test_lora_rank_zero_imports():
    cfg = small_config("gqa", lora_rank=0)
    model = open_mythos_model(cfg)
    s, ours_model = wb.from_open_mythos(model, cfg)
    assert s.recurrent.lora_rank == 0 and not any("lora" in p.path for p in spec.manifest(s))
    ids = torch.arange(10).view(1, 10)
    ref_logits, ref_steps, _, _ = reference(model, ids, 4)
    logits, counts, _, _, _ = ours("torch", ours_model, ids, 4)
    assert np.abs(logits - ref_logits).max() <= F32_TOL
    np.testing.assert_array_equal(counts, ref_steps)


# --------------------------------------------------------------------------- config map


def test_config_defaults_and_fields_match_open_mythos():
    fields = {f.name: f.default for f in dataclasses.fields(MythosConfig)}
    assert fields == om.CONFIG_DEFAULTS
    assert list(fields) == list(om.CONFIG_MAP)  # every MythosConfig field is mapped (or ignored on purpose)


@pytest.mark.parametrize("variant", list(om.VARIANTS))
def test_variants_are_our_presets(variant):
    cfg = getattr(variants, variant)()
    s = wb.spec_from_config(cfg)
    assert s == spec.preset(om.VARIANTS[variant]) == wb.spec_from_config(variant)
    back = wb.config_from_spec(s)
    assert back == {**dataclasses.asdict(cfg), "max_output_tokens": back["max_output_tokens"]}  # a generate() default


@pytest.mark.parametrize("fields, message", [
    ({"n_heds": 4}, "unknown MythosConfig field 'n_heds'.*did you mean 'n_heads'"),
    ({"attn_type": "flash"}, "attn_type='flash': open-mythos builds GQA for anything but 'mla'"),
    ({"attn_type": "gqa", "dim": 30, "n_heads": 4}, "attention.n_heads=4 must divide dim=30.*n_heads -> attention.n_heads"),
    ({"dim": 24}, "recurrent.loop_embedding.dim=3"),  # open-mythos' loop_dim = dim // 8 is odd
    ({"act_threshold": 1.5}, "halting.threshold=1.5.*act_threshold -> halting.threshold"),
    ({"n_experts": 2, "n_experts_per_tok": 4}, "moe.top_k=4 must be between 1 and moe.n_experts=2"),
    ({"dropout": 1.0}, "dropout=1.0 must be a number in"),
])
def test_unrepresentable_configs_are_refused(fields, message):
    with pytest.raises(BridgeError, match=message):
        wb.spec_from_config(fields)


def test_dropout_is_ignored_at_inference():
    assert wb.spec_from_config({**dataclasses.asdict(small_config("gqa")), "dropout": 0.1}) == wb.spec_from_config(small_config("gqa"))


# --------------------------------------------------------------------------- refusals


def _mutations(sd: dict, cfg: MythosConfig):
    e0 = "recurrent.block.ffn.routed_experts.0.gate.weight"
    yield "missing", {k: v for k, v in sd.items() if k != e0}, f"{e0}: missing"
    yield "extra", {**sd, "recurrent.block.ffn.routed_experts.8.up.weight": sd[e0]}, "routed_experts.8.up.weight: not an open-mythos"
    yield "shape", {**sd, e0: sd[e0].T}, f"{e0}: shape (64, 24) but the config implies (24, 64)"
    yield "dtype", {**sd, "norm.weight": sd["norm.weight"].double()}, "norm.weight: dtype float64 but expected float32"
    yield "untied", {**sd, "head.weight": sd["head.weight"] + 1}, "head.weight: differs from embed.weight"
    wrong = om.torch_rope_buffer(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta / 50)
    yield "rope", {**sd, "freqs_cis": wrong}, "freqs_cis: differs from the RoPE table"
    yield "two at once", {**{k: v for k, v in sd.items() if k != "norm.weight"}, e0: sd[e0][:3]}, "2 problems"


def test_state_dict_refusals_name_the_tensor():
    cfg = small_config("gqa")
    sd = open_mythos_model(cfg).state_dict()
    for case, bad, message in _mutations(sd, cfg):
        with pytest.raises(BridgeError) as err:
            wb.from_open_mythos(bad, cfg)
        assert message in str(err.value), case
    with pytest.raises(BridgeError, match="does not carry its config"):
        wb.from_open_mythos(sd)
    with pytest.raises(BridgeError) as err:  # a wrapped model: every name is wrong, the message stays short
        wb.from_open_mythos({f"_orig_mod.{k}": v for k, v in sd.items()}, cfg)
    assert len(err.value.errors) == 2 * len(sd) and "... and" in str(err.value)
    assert len(str(err.value).splitlines()) < 50


# --------------------------------------------------------------------------- .pt -> safetensors


@pytest.mark.parametrize("attn, cfg_format", [("gqa", "yaml"), ("mla", "json")])
def test_convert_pt_to_safetensors(tmp_path, attn, cfg_format):
    cfg = small_config(attn)
    model = open_mythos_model(cfg, seed=3)
    torch.save(model.state_dict(), tmp_path / "om.pt")
    cfg_path = tmp_path / f"cfg.{cfg_format}"
    fields = dataclasses.asdict(cfg)
    cfg_path.write_text(yaml.safe_dump(fields) if cfg_format == "yaml" else json.dumps(fields))

    res = cli.convert(tmp_path / "om.pt", tmp_path / "m.safetensors", config=cfg_path)
    assert res.dtype == "float32" and res.spec == wb.spec_from_config(cfg)
    # the same file as importing in memory and saving
    wb.save(wb.from_open_mythos(model, backend="jax")[1], tmp_path / "direct.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "direct.safetensors").read_bytes()

    ids = torch.randint(0, cfg.vocab_size, IDS_SHAPE, generator=torch.Generator().manual_seed(4))
    ref_logits, ref_steps, _, _ = reference(model, ids, 10)
    for backend in ("torch", "jax"):
        logits, counts, _, _, _ = ours(backend, wb.load(res.path, backend=backend), ids, 10)
        assert np.abs(logits - ref_logits).max() <= F32_TOL
        np.testing.assert_array_equal(counts, ref_steps)

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": model.state_dict(), "step": torch.tensor(7)}, wrapped)
    res64 = cli.convert(wrapped, tmp_path / "m64.safetensors", config=fields, dtype="float64")
    check = cli.check(res64.path, "torch", batch=IDS_SHAPE[0], n_tokens=IDS_SHAPE[1], n_loops=10)
    # twin vs twin under openmythos-0.5: float64 too is bounded by the float32 RoPE (measured ~8e-11)
    assert res64.dtype == "float64" and check.ok and check.max_abs_diff <= F64_TOL, check


class NotATensor:
    pass


def test_convert_refuses_before_writing(tmp_path):
    cfg = small_config("gqa")
    sd = open_mythos_model(cfg).state_dict()
    out = tmp_path / "out.safetensors"
    torch.save(sd, tmp_path / "om.pt")
    with pytest.raises(BridgeError, match="does not carry its config"):
        cli.convert(tmp_path / "om.pt", out)
    with pytest.raises(BridgeError, match="loading it would run code stored in the file"):
        torch.save({"x": NotATensor()}, tmp_path / "evil.pt")  # a pickled object weights_only refuses
        cli.convert(tmp_path / "evil.pt", out, config=dataclasses.asdict(cfg))
    raw = (tmp_path / "om.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BridgeError, match="not a readable torch checkpoint"):
        cli.convert(tmp_path / "cut.pt", out, config=dataclasses.asdict(cfg))
    with pytest.raises(BridgeError, match="recurrent.lora.B: shape"):
        cli.convert(tmp_path / "om.pt", out, config={**dataclasses.asdict(cfg), "lora_rank": 0})
    assert not out.exists()
    out.write_bytes(b"previous")
    with pytest.raises(BridgeError, match="shape"):
        cli.convert(tmp_path / "om.pt", out, config={**dataclasses.asdict(cfg), "expert_dim": 32})
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []


# --------------------------------------------------------------------------- by hand, without the bridge
# open-mythos' state dict mapped to our manifest here, independently of weights_bridge, into the torch twin


def open_mythos_arrays(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """open-mythos' state dict -> our manifest arrays (torch layout), by hand."""
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for k, v in sd.items():
        if k.startswith("freqs_cis") or k == "head.weight":  # RoPE tables; the head is tied to embed
            continue
        a = v.detach().double().numpy()
        if ".routed_experts." in k:  # routed_experts.{e}.gate.weight (h, d) -> experts.gate[e] (d, h)
            prefix, rest = k.split(".routed_experts.")
            e, name, _ = rest.split(".")
            experts.setdefault(f"{prefix}.experts.{name}", {})[int(e)] = a.T
        elif k == "recurrent.lora.scale.weight":  # an nn.Embedding there, a plain parameter here
            out["recurrent.lora.scale"] = a
        else:
            out[k] = a
    for k, per in experts.items():
        out[k] = np.stack([per[e] for e in sorted(per)])
    return out


OM_SHAPE = dict(vocab_size=64, dim=32, max_seq_len=32, prelude_layers=1, coda_layers=2)
OM_ATTN = dict(n_heads=4, n_kv_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
               v_head_dim=8)
OM_MOE = dict(n_experts=5, n_shared_experts=1, top_k=2, expert_dim=16)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_hand_mapped_weights_give_open_mythos_logits_and_loop_counts(attn, dtype):
    N = 4
    cfg = MythosConfig(**OM_SHAPE, **OM_ATTN, attn_type=attn, max_loop_iters=N, lora_rank=4,
                       n_experts=OM_MOE["n_experts"], n_shared_experts=OM_MOE["n_shared_experts"],
                       n_experts_per_tok=OM_MOE["top_k"], expert_dim=OM_MOE["expert_dim"])
    torch.manual_seed(0)
    model = OpenMythos(cfg).eval()
    probs: list[torch.Tensor] = []
    model.recurrent.act.register_forward_hook(lambda mod, args, out: probs.append(out.detach().clone()))
    with torch.no_grad():  # spread the halting probabilities so positions halt at different steps
        model.recurrent.block.ffn.router_bias.copy_(torch.randn(OM_MOE["n_experts"]) * 0.05)
        model.recurrent.act.halt.weight.mul_(40.0)
        model(torch.from_numpy(np.random.default_rng(99).integers(0, 64, (4, 16))), n_loops=N)
        model.recurrent.act.halt.bias.sub_(torch.logit(torch.stack(probs)).mean() + 1.0)  # p ~ 0.3 on average
    s = spec.load({"semantics": "openmythos-0.5", **OM_SHAPE, "attention": {"type": attn, **OM_ATTN},
                   "recurrent": {"max_loop_iters": N, "lora_rank": 4}, "moe": OM_MOE})
    ours_model = mt.build(s, dtype=dtype, weights=open_mythos_arrays(model.state_dict()))
    # float64: both rotate in float32, where NumPy's cos/sin table and torch's vectorised complex
    # multiply differ from ours by 1 ulp in some entries (see test_openmythos_rope_...), ~1e-11 here
    tol = 1e-5 if dtype == "float32" else 1e-10
    model = model.double() if dtype == "float64" else model  # its RoPE tables stay complex64
    seen = set()
    for n_loops in (1, 3, N, N + 2):  # N + 2: beyond training depth (LoRA index clamp)
        ids = torch.from_numpy(np.random.default_rng(n_loops).integers(0, 64, (3, 16)))
        probs.clear()
        with torch.no_grad():
            ref = model(ids, n_loops=n_loops)
            out = ours_model(ids, n_loops)
        assert report(f"{attn} {dtype} n_loops={n_loops} logits vs open-mythos", out.logits, ref) < tol
        # loop counts implied by open-mythos' own halting probabilities, recomputed in their dtype
        p = torch.stack(probs).reshape(len(probs), -1).numpy()
        _, _, _, counts, halted = act_reference(p, 0.99, graves=False, n_loops=n_loops)
        assert len(probs) == out.n_steps
        np.testing.assert_array_equal(out.loop_counts.reshape(-1).numpy(), counts)
        np.testing.assert_array_equal(out.halted.reshape(-1).numpy(), halted)
        seen |= set(zip(counts.tolist(), halted.tolist()))
    print(f"{attn}: (count, halted) pairs seen: {sorted(seen)}")
    assert len(seen) >= 3  # several halting steps and never-halted positions were exercised


def test_openmythos_rope_rotates_in_float32_even_in_a_float64_model():
    s = spec.load("tiny", overrides={"semantics": "openmythos-0.5", "halting.remainder": "openmythos"})
    m = mt.Mythos(s, dtype=torch.float64)
    assert m.rope_cos.dtype == m.rope_sin.dtype == torch.float32
    freqs = om_main.precompute_rope_freqs(s.rope_dim, s.max_seq_len, s.rope_theta)
    ulp = 2.0**-23
    assert report("rope table vs torch.polar", m.rope_cos, freqs.real) <= ulp
    assert report("rope table vs torch.polar", m.rope_sin, freqs.imag) <= ulp
    x = torch.randn(3, 16, 4, s.rope_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours_rot = mt.apply_rope(x, m.rope_cos[:16], m.rope_sin[:16])
    ref = om_main.apply_rope(x, freqs[:16])
    assert ours_rot.dtype == torch.float64 and torch.equal(ours_rot, ours_rot.float().double())  # rotated in float32
    assert report("rotation vs open-mythos", ours_rot, ref) <= 4 * ulp * x.abs().max().item()
    assert (ours_rot == ref).double().mean() > 0.5
