"""The spec: loading, round trips, overrides, validation messages, the manifest and its counts."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import spec as S

# Counts of open-mythos 0.5.0's own models (sum of model.parameters() built on torch's meta device),
# an independent source; test_counts_equal_open_mythos_live recomputes them from the package.
OPEN_MYTHOS_COUNTS = {
    "1b": 1_064_028_034, "3b": 3_041_725_186, "10b": 9_981_316_994, "50b": 50_374_247_426,
    "100b": 99_545_072_130, "500b": 497_849_137_154, "1t": 999_326_352_386,
}


@pytest.mark.parametrize("name", S.preset_names())
def test_every_preset_loads_and_round_trips(name):
    s = S.preset(name)
    assert S.load(S.dump(s)) == s
    assert S.load(S.to_dict(s)) == s
    assert S.load(s) == s


def test_load_accepts_path_text_dict_and_name(tmp_path):
    s = S.preset("tiny")
    p = tmp_path / "m.yaml"
    p.write_text(S.dump(s))
    assert S.load(p) == s == S.load(str(p)) == S.load("tiny") == S.load(S.dump(s))


def test_overrides_by_dotted_path():
    s = S.load("tiny", overrides={"attention.type": "mla", "moe.top_k": 1, "recurrent.loop_embedding.enabled": False})
    assert (s.attention.type, s.moe.top_k, s.loop_dim) == ("mla", 1, 0)
    assert S.parse_override("halting.threshold=0.5") == ("halting.threshold", 0.5)


def test_spec_is_frozen():
    s = S.preset("tiny")
    with pytest.raises(AttributeError):
        s.dim = 64  # type: ignore[misc]


def test_yaml_scientific_notation_without_dot_is_a_number():
    s = S.load("tiny", overrides={"norm_eps": "1e-5"})
    assert s.norm_eps == 1e-5


def test_safe_loader_refuses_python_tags():
    with pytest.raises(S.SpecError, match="not valid YAML"):
        S.load("vocab_size: !!python/object/apply:os.system ['true']\ndim: 8\nmax_seq_len: 8\n")


# field overrides on `tiny` -> the message that must come out (field path, value, what is allowed)
BAD = [
    ({"attention.n_kv_heads": 3}, "attention.n_kv_heads=3 must divide attention.n_heads=4"),
    ({"attention.n_heads": 5}, "attention.n_heads=5 must divide dim=32"),
    ({"attention.type": "mqa"}, "attention.type='mqa' is not allowed; allowed: gqa, mla"),
    ({"attention.n_heads": 32, "attention.n_kv_heads": 1}, "must be even (RoPE rotates pairs)"),
    ({"attention.type": "mla", "attention.qk_rope_head_dim": 3}, "attention.qk_rope_head_dim=3 must be even"),
    ({"attention.type": "mla", "attention.kv_lora_rank": 0}, "attention.kv_lora_rank=0 must be an integer in [1, 65536]"),
    ({"moe.top_k": 5}, "moe.top_k=5 must be between 1 and moe.n_experts=4"),
    ({"moe.top_k": 0}, "moe.top_k=0 must be an integer in [1, 65536]"),
    ({"moe.n_shared_experts": -1}, "moe.n_shared_experts=-1 must be an integer in [0, 1024]"),
    ({"halting.threshold": 1.5}, "halting.threshold=1.5 must be a finite number in (0, 1]"),
    ({"halting.threshold": 0}, "halting.threshold=0.0 must be a finite number in (0, 1]"),
    ({"halting.remainder": "grave"}, "halting.remainder='grave' is not allowed; allowed: graves, openmythos (did you mean 'graves'?)"),
    ({"halting.head": "mlp", "halting.mlp_hidden": 0}, "halting.mlp_hidden=0 must be an integer in [1, 1048576]"),
    ({"recurrent.max_loop_iters": 0}, "recurrent.max_loop_iters=0 must be an integer in [1, 1024]"),
    ({"recurrent.ffn": "sparse"}, "recurrent.ffn='sparse' is not allowed; allowed: moe, dense"),
    ({"recurrent.lora_rank": -2}, "recurrent.lora_rank=-2 must be an integer in [0, 4096]"),
    ({"recurrent.loop_embedding.dim": 3}, "recurrent.loop_embedding.dim=3 must be even and >= 2"),
    ({"recurrent.loop_embedding.dim": 64}, "recurrent.loop_embedding.dim=64 must be <= dim=32"),
    ({"dim": 8}, "recurrent.loop_embedding.dim=1 (dim // 8) must be even and >= 2"),
    ({"vocab_size": 1}, "vocab_size=1 must be an integer in [2, 16777216]"),
    ({"vocab_size": 2.5}, "vocab_size=2.5 must be an integer in [2, 16777216]"),
    ({"dim": True}, "dim=True must be an integer"),
    ({"norm_eps": "small"}, "norm_eps='small' must be a number"),
    ({"norm_eps": 0}, "norm_eps=0.0 must be a finite number in (0, 1]"),
    ({"tie_embeddings": "yes"}, "tie_embeddings='yes' must be true or false"),
    ({"semantics": "openmythos"}, "semantics='openmythos' is not allowed; allowed: mythos, openmythos-0.5 (did you mean 'openmythos-0.5'?)"),
    ({"semantics": "openmythos-0.5", "halting.remainder": "graves"}, "halting.remainder='graves' conflicts with semantics=openmythos-0.5"),
    ({"semantics": "openmythos-0.5", "tie_embeddings": False}, "tie_embeddings=False conflicts with semantics=openmythos-0.5"),
    ({"moe.n_expert": 4}, "unknown field moe.n_expert (did you mean 'n_experts'?)"),
    ({"atention": {}}, "unknown field atention (did you mean 'attention'?)"),
    ({"attention": 3}, "attention must be a mapping of fields"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_spec_message(overrides, message):
    with pytest.raises(S.SpecError) as err:
        S.load("tiny", overrides=overrides)
    assert message in str(err.value)


def test_semantics_fills_what_it_fixes():
    s = S.load("tiny", overrides={"semantics": "openmythos-0.5"})
    assert s.halting.remainder == "openmythos" and s.tie_embeddings


def test_missing_required_field_and_unknown_preset():
    with pytest.raises(S.SpecError, match="vocab_size is required"):
        S.load({"dim": 8, "max_seq_len": 8})
    with pytest.raises(S.SpecError, match="did you mean 'tiny'"):
        S.preset("tinny")
    with pytest.raises(S.SpecError, match="does not exist"):
        S.load("nowhere/spec.yaml")


@pytest.mark.parametrize("size", sorted(OPEN_MYTHOS_COUNTS))
def test_counts_equal_open_mythos(size):
    assert S.count_params(S.preset(f"openmythos-{size}"))["total"] == OPEN_MYTHOS_COUNTS[size]


@pytest.mark.interop
def test_counts_equal_open_mythos_live():
    import torch  # a core dependency; open-mythos is the interop marker's
    from open_mythos import variants
    from open_mythos.main import OpenMythos

    for size in ("1b", "3b", "10b"):
        cfg = getattr(variants, f"mythos_{size}")()
        with torch.device("meta"):
            model = OpenMythos(cfg)
        assert S.count_params(S.preset(f"openmythos-{size}"))["total"] == sum(p.numel() for p in model.parameters())


def test_manifest_is_unique_and_counts_add_up():
    for name in ("tiny", "bench-s-mla"):
        s = S.preset(name)
        m = S.manifest(s)
        paths = [p.path for p in m]
        assert len(paths) == len(set(paths))
        c = S.count_params(s)
        assert c["total"] == sum(p.numel for p in m if p.kind != "buffer")
        assert c["active"] == c["total"] - (s.moe.n_experts - s.moe.top_k) * 3 * s.dim * s.moe.expert_dim


def test_manifest_follows_options():
    dense = {p.path for p in S.manifest(S.load("tiny", overrides={"recurrent.ffn": "dense", "tie_embeddings": False,
                                                                 "recurrent.lora_rank": 0, "halting.head": "mlp"}))}
    assert "recurrent.block.ffn.gate.weight" in dense and "recurrent.block.ffn.router.weight" not in dense
    assert "head.weight" in dense and not any(p.startswith("recurrent.lora") for p in dense)
    assert "recurrent.act.halt.fc2.bias" in dense


def test_init_arrays_deterministic_and_follow_rules():
    s = S.preset("tiny")
    a, b, c = S.init_arrays(s, 0), S.init_arrays(s, 0), S.init_arrays(s, 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["embed.weight"], c["embed.weight"])
    assert np.all(a["recurrent.norm.weight"] == 1) and np.all(a["recurrent.injection.B"] == 0.1)
    assert np.all(a["recurrent.block.ffn.router_bias"] == 0)
    bound = 1 / math.sqrt(s.dim)
    assert np.all(np.abs(a["recurrent.act.halt.bias"]) <= bound)
    big = S.init_arrays(S.preset("bench-s-gqa"), 0)["embed.weight"]
    assert abs(big.std() - 0.02) < 5e-4 and abs(big.mean()) < 5e-4


def test_rope_table_matches_definition():
    s = S.preset("tiny")
    cos, sin = S.rope_table(s)
    d = s.head_dim
    pos, k = 7, 3
    angle = pos * s.rope_theta ** (-2 * k / d)
    assert cos.shape == (s.max_seq_len, d // 2)
    assert cos[pos, k] == pytest.approx(math.cos(angle), abs=1e-15)
    assert sin[pos, k] == pytest.approx(math.sin(angle), abs=1e-15)


def test_loop_table_matches_definition():
    s = S.preset("bench-s-gqa")
    L = s.loop_dim
    tab = S.loop_table(s, 5)
    t, j = 4, 2
    w = 10000 ** (-2 * j / L)
    assert tab.shape == (5, L)
    assert tab[t, j] == pytest.approx(math.sin(t * w), abs=1e-15)
    assert tab[t, L // 2 + j] == pytest.approx(math.cos(t * w), abs=1e-15)
    assert np.all(tab[0, : L // 2] == 0) and np.all(tab[0, L // 2:] == 1)


@given(
    attn=st.sampled_from(["gqa", "mla"]), ffn=st.sampled_from(["moe", "dense"]),
    heads=st.sampled_from([1, 2, 4]), loops=st.integers(1, 8), thr=st.floats(0.05, 1.0),
    rem=st.sampled_from(["graves", "openmythos"]), tie=st.booleans(), lora=st.integers(0, 4),
)
def test_random_valid_specs_round_trip(attn, ffn, heads, loops, thr, rem, tie, lora):
    s = S.load("tiny", overrides={
        "attention.type": attn, "attention.n_heads": heads, "attention.n_kv_heads": 1, "recurrent.ffn": ffn,
        "recurrent.max_loop_iters": loops, "halting.threshold": thr, "halting.remainder": rem,
        "tie_embeddings": tie, "recurrent.lora_rank": lora,
    })
    assert S.load(S.dump(s)) == s
    assert S.count_params(s)["total"] == sum(p.numel for p in S.manifest(s) if p.kind != "buffer")


def test_costs_are_consistent():
    s = S.preset("bench-s-gqa")
    f4, f8 = S.flops_per_token(s, 256, 4), S.flops_per_token(s, 256, 8)
    assert f8["recurrent"] == pytest.approx(2 * f4["recurrent"])
    assert f8["prelude"] == f4["prelude"]
    kv = S.kv_cache_bytes_per_token(s, "float32")
    assert kv["per_layer"] == 2 * 2 * 32 * 4  # k and v, 2 kv heads of 32, float32
    mla = S.kv_cache_bytes_per_token(S.preset("bench-s-mla"), "float32")
    assert mla["per_layer"] == (64 + 16) * 4  # c_kv and one rope key per token
    om = S.kv_cache_bytes_per_token(S.load("bench-s-mla", overrides={"semantics": "openmythos-0.5"}), "float32")
    assert om["per_layer"] == (64 + 8 * 16) * 4  # open-mythos caches the rope key per head
