"""The `mythos` command line: info, presets, convert and check (parity has its own tests)."""

import dataclasses

import pytest
import yaml
from typer.testing import CliRunner

import spec as S
from mythos.cli import app

runner = CliRunner()


def test_info_reports_counts_flops_and_cache():
    r = runner.invoke(app, ["info", "openmythos-1b"])
    assert r.exit_code == 0, r.output
    assert "1,064,028,034" in r.output  # open-mythos' own count of its 1b model
    assert "FLOPs per token" in r.output and "KV cache per token" in r.output


def test_info_shows_the_hypothesised_components():
    sets = ["recurrent.compressor.enabled=true", "recurrent.cross_loop_attention.enabled=true",
            "recurrent.memory_gate.enabled=true", "value_head.enabled=true"]
    r = runner.invoke(app, ["info", "tiny", *[x for kv in sets for x in ("--set", kv)]])
    assert r.exit_code == 0, r.output
    s = S.preset("tiny", dict(S.parse_override(kv) for kv in sets))
    counts = S.count_params(s)
    for group in ("recurrent.cross_loop", "recurrent.compressor", "recurrent.memory_gate", "value_head"):
        assert group in counts and f"{counts[group]:,}" in r.output, group  # parameter rows
    for part in ("cross_loop", "compressor", "memory_gate", "value_head"):
        assert part in S.flops_per_token(s, 256) and part in r.output  # FLOP rows
    kv = S.kv_cache_bytes_per_token(s)
    assert "compressor summaries" in r.output and f"{kv['total']:,}" in r.output


def test_info_set_and_bad_spec_exit_2():
    r = runner.invoke(app, ["info", "tiny", "--set", "attention.n_kv_heads=3"])
    assert r.exit_code == 2
    assert "attention.n_kv_heads=3 must divide attention.n_heads=4" in r.output


def test_presets_lists_every_preset():
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0
    assert all(name in r.output for name in S.preset_names())


@pytest.mark.interop
def test_convert_open_mythos_checkpoint_then_check(tmp_path):
    import torch
    from open_mythos.main import MythosConfig, OpenMythos

    torch.manual_seed(0)
    cfg = MythosConfig(vocab_size=96, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=32, max_loop_iters=3,
                       prelude_layers=1, coda_layers=1, attn_type="gqa", n_experts=4, n_shared_experts=1,
                       n_experts_per_tok=2, expert_dim=16, lora_rank=2)
    pt, cfg_file, out = tmp_path / "om.pt", tmp_path / "om.yaml", tmp_path / "om.safetensors"
    torch.save(OpenMythos(cfg).state_dict(), pt)
    cfg_file.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))

    refused = runner.invoke(app, ["convert", str(pt), str(out)])  # no config: refused, nothing written
    assert refused.exit_code == 2 and not out.exists()

    r = runner.invoke(app, ["convert", str(pt), str(out), "--config", str(cfg_file)])
    assert r.exit_code == 0, r.output
    assert out.exists() and "PASS" in r.output
    r = runner.invoke(app, ["check", str(out), "--backend", "jax"])
    assert r.exit_code == 0 and "PASS" in r.output
