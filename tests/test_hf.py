"""The Hugging Face integration (mythos/hf, docs/huggingface.md), offline.

Every expected value has its own source: the project's `generate` (greedy), HF's beam search without a cache
(a full recompute each step) and a brute-force beam search written here over the twin's forward, a sampling
loop written here that draws the same torch RNG, a NumPy cross-entropy, the rows run alone, the model before
saving, a fresh process that never imports `mythos`, and `mythos.tokenizer.ByteTokenizer`.

The models use init.std=0.5 so that greedy tokens vary from step to step (at the default 0.02 a random tiny
model repeats one token, which would hide a wrong position or cache row).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is ever downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'mythos[hf]')")
import torch  # noqa: E402
import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import mythos_torch as mt  # noqa: E402
import spec as S  # noqa: E402
import weights_bridge as wb  # noqa: E402
from mythos.cli import app  # noqa: E402
from mythos.hf import MythosCache, MythosConfig, MythosForCausalLM  # noqa: E402
from mythos.tokenizer import ByteTokenizer  # noqa: E402

pytestmark = [pytest.mark.hf, pytest.mark.usefixtures("one_torch_thread")]
runner = CliRunner()
VARIED = {"init.std": 0.5}  # see the module docstring
SPECS = {
    "tiny": {},
    "moe-mla": {"attention.type": "mla"},
    "openmythos-mla": {"semantics": "openmythos-0.5", "attention.type": "mla"},  # per-head rope-key cache layout
    "compressor": {"recurrent.compressor.enabled": True, "recurrent.compressor.chunk": 4},
}
BYTES = {**VARIED, "vocab_size": 258}


def twin(overrides: dict, dtype: str = "float32", seed: int = 0) -> mt.Mythos:
    return mt.build(S.preset("tiny", {**VARIED, **overrides}), seed=seed, dtype=dtype)


def cache_of(out) -> MythosCache:
    """The output's cache: the field is `cache` in transformers 5.24, `past_key_values` in 5.19."""
    return out.cache if "cache" in out else out.past_key_values


def prompts(B: int = 2, T: int = 5, V: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, V, (B, T)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A byte-vocabulary model and the directory its save_pretrained wrote."""
    model = MythosForCausalLM.from_twin(twin(BYTES))
    path = tmp_path_factory.mktemp("hf") / "tiny-bytes"
    model.save_pretrained(path)
    return model, path


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_equals_the_project_generate(name):
    """40 new tokens from 5: the HF cache starts at 16 positions and grows twice (16 -> 32 -> 64)."""
    tw = twin(SPECS[name])
    ids = prompts()
    want = tw.generate(ids, 40)
    got = MythosForCausalLM.from_twin(tw).generate(ids, max_new_tokens=40, do_sample=False)
    assert len(set(want[:, 5:].flatten().tolist())) > 3, "tokens do not vary: the test would not see a wrong cache"
    assert torch.equal(got, want)


def brute_force_beam(tw: mt.Mythos, ids: torch.Tensor, num_beams: int, new: int) -> torch.Tensor:
    """Beam search over full forwards: keep the num_beams best extensions by summed log-probability (float32, as
    transformers scores), return the best sequence of each row after `new` tokens."""
    rows = []
    for row in ids:
        beams = [(torch.zeros((), dtype=torch.float32), row)]
        for _ in range(new):
            cand = []
            for score, seq in beams:
                logp = torch.log_softmax(tw(seq[None]).logits[0, -1].float(), -1)
                cand += [(score + logp[v], torch.cat([seq, torch.tensor([v])])) for v in range(logp.shape[0])]
            cand.sort(key=lambda c: -float(c[0]))
            beams = cand[:num_beams]
        rows.append(beams[0][1])
    return torch.stack(rows)


def test_beam_search_with_cache_equals_recompute_and_brute_force():
    tw = twin({}, dtype="float64")  # float64 logits: the cached and recomputed scores agree far below float32
    model = MythosForCausalLM.from_twin(tw)
    ids = prompts(T=4, seed=1)
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False)
    cached = model.generate(ids, **kw)
    recomputed = model.generate(ids, use_cache=False, **kw)
    with torch.no_grad():
        brute = brute_force_beam(tw, ids, 3, 5)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, brute)
    assert not torch.equal(cached, tw.generate(ids, 5)), "beam search picked the greedy path: a weak test"


def test_sampling_equals_a_loop_drawing_the_same_torch_rng():
    """transformers samples with torch.multinomial on the global generator, one (B, V) draw per step, after the
    temperature and top-k warpers. The loop below makes the same calls on full recomputes of a float64 model, so
    with the same seed it draws the same tokens (its probability rows equal the cached ones far below float32
    rounding). The project's own sampler uses a NumPy generator, so it is not the reference here."""
    tw = twin({}, dtype="float64")
    model = MythosForCausalLM.from_twin(tw)
    ids = prompts(seed=2)
    temperature, top_k, new = 0.8, 20, 12
    torch.manual_seed(7)
    got = model.generate(ids, max_new_tokens=new, do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0)
    torch.manual_seed(7)
    seq = ids
    with torch.no_grad():
        for _ in range(new):
            scores = tw(seq).logits[:, -1].float() / temperature
            scores = scores.masked_fill(scores < torch.topk(scores, top_k).values[:, -1:], float("-inf"))
            tok = torch.multinomial(torch.softmax(scores, -1), num_samples=1)
            seq = torch.cat([seq, tok], dim=1)
    assert torch.equal(got, seq)
    assert not torch.equal(got, tw.generate(ids, new)), "sampling gave the greedy tokens: a weak test"


@pytest.mark.parametrize("name", ["tiny", "moe-mla"])
def test_left_padded_batch_equals_each_row_alone(name):
    tw = twin({**SPECS[name], "vocab_size": 258})
    model = MythosForCausalLM.from_twin(tw)
    rows = [torch.tensor([256, 5, 9, 200, 31, 7, 42]), torch.tensor([256, 17, 3]), torch.tensor([256, 99, 98, 97, 96])]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - len(r),), 257), r]) for r in rows])  # left padding with EOS
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    new = 10
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    for b, row in enumerate(rows):
        alone = tw.generate(row[None], new, eos_id=257)[0, len(row):]  # the project's, eos-padded like HF
        got = batched[b, width:]
        assert torch.equal(got, alone[:len(got)]) and bool((alone[len(got):] == 257).all()), (b, got, alone)


def test_padding_with_the_compressor_is_refused_clearly():
    model = MythosForCausalLM.from_twin(twin(SPECS["compressor"]))
    ids, mask = prompts(T=6), torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="compressor"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)


def test_cache_reorder_and_growth_keep_each_rows_state():
    """reorder_cache permutes every cache array and the rows' padding; growing copies them: continuing from the
    reordered, grown cache equals the swapped rows run alone (float64: rounding far below the tolerance)."""
    tw = twin({}, dtype="float64")
    model = MythosForCausalLM.from_twin(tw)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
    assert isinstance(cache, MythosCache) and cache.get_seq_length() == 13 and cache.kv.capacity == 16
    cache.reorder_cache(torch.tensor([1, 0]))
    step = torch.arange(8).reshape(2, 4) + 20  # 13 + 4 > 16: the cache grows to 32
    got = model(step, attention_mask=torch.cat([mask.flip(0), torch.ones(2, 4, dtype=torch.long)], 1), cache=cache)
    assert cache.kv.capacity == 32 and cache.get_seq_length() == 17
    with torch.no_grad():
        full0 = tw(torch.cat([ids[1], step[0]])[None]).logits[0, 13:]
        full1 = tw(torch.cat([ids[0, 2:], step[1]])[None]).logits[0, 11:]
    torch.testing.assert_close(got.logits[0], full0, atol=1e-10, rtol=0)
    torch.testing.assert_close(got.logits[1], full1, atol=1e-10, rtol=0)


def test_pipeline_text_generation_runs(saved):
    model, path = saved
    tok = transformers.AutoTokenizer.from_pretrained(path)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    text = pipe("hello", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    ids = model.generate(tok("hello", return_tensors="pt").input_ids, max_new_tokens=6, do_sample=False)
    assert text == ByteTokenizer().decode(ids[0]) and text.startswith("hello")


# --------------------------------------------------------------------------- forward and loss


def test_labels_loss_equals_a_numpy_cross_entropy():
    tw = twin({}, dtype="float64")
    model = MythosForCausalLM.from_twin(tw)
    ids = prompts(B=3, T=9, seed=3)
    labels = ids.clone()
    labels[0, 4:] = -100
    labels[2, 1] = -100
    out = model(ids, labels=labels)
    with torch.no_grad():
        logits = tw(ids).logits.numpy()
    terms = []
    for b in range(3):
        for t in range(8):
            y = int(labels[b, t + 1])
            if y != -100:
                z = logits[b, t]
                terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[y])
    assert out.loss.dtype == torch.float64
    assert abs(out.loss.item() - float(np.mean(terms))) < 1e-12
    torch.testing.assert_close(out.logits, torch.from_numpy(logits), atol=0, rtol=0)
    assert torch.equal(out.loop_counts, tw(ids).loop_counts)
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(ids, labels=labels[:, :4])


def test_forward_arguments_both_cache_names_and_refusals():
    tw = twin({}, dtype="float64")
    model = MythosForCausalLM.from_twin(tw)
    ids = prompts(T=6)
    cache = cache_of(model(ids[:, :4], use_cache=True))
    older = model(ids[:, 4:], past_key_values=cache)  # transformers 5.19's name
    with torch.no_grad():
        want = tw(ids).logits[:, 4:]
    torch.testing.assert_close(older.logits, want, atol=1e-10, rtol=0)
    other = cache_of(model(ids, use_cache=True))
    for bad, match in ((dict(position_ids=torch.arange(6)[None]), "does not take position_ids"),
                       (dict(inputs_embeds=torch.zeros(2, 6, 32, dtype=torch.float64)), "inputs_embeds is not"),
                       (dict(cache=cache, past_key_values=other), "pass the cache once")):
        with pytest.raises(ValueError, match=match):
            model(ids, **bad)
    # config.n_loops is the default loop count of every call
    three = MythosForCausalLM(MythosConfig.from_spec(tw.spec, dtype="float64", n_loops=3), model=tw)
    with torch.no_grad():
        assert torch.equal(three(ids).logits, tw(ids, 3).logits)


def test_config_round_trip_and_refusals(tmp_path):
    s = S.preset("tiny", BYTES)
    cfg = MythosConfig.from_spec(s, dtype="float64", n_loops=3)
    cfg.save_pretrained(tmp_path)
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, MythosConfig) and back.mythos_spec == s and back.n_loops == 3
    assert (back.vocab_size, back.hidden_size, back.max_position_embeddings) == (258, 32, 64)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (256, 257, 257)
    assert MythosConfig.from_spec(S.preset("tiny")).eos_token_id is None  # 64 ids: no byte tokenizer
    for kw, match in ((dict(vocab_size=100), "vocab_size=100 disagrees with the spec"),
                      (dict(n_loops=0), "n_loops"), (dict(dtype="float16"), "dtype"),
                      (dict(eos_token_id=300), "eos_token_id=300 must be a token id"),
                      (dict(spec={"dim": "wide"}), "the spec is not valid")):
        with pytest.raises(ValueError, match=match):
            MythosConfig(**{"spec": S.to_dict(s), **kw})


# --------------------------------------------------------------------------- the directory


def test_save_then_from_pretrained_gives_the_same_tokens(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([
        "README.md", "config.json", "configuration_mythos.py", "generation_config.json", "hub_mythos.py",
        "model.safetensors", "modeling_mythos.py", "tokenizer.json", "tokenizer_config.json"])
    ids = torch.tensor([[256, 104, 105, 33], [256, 1, 2, 3]])
    before = model.generate(ids, max_new_tokens=20, do_sample=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(back, MythosForCausalLM)
    # from_pretrained builds on the meta device: the RoPE tables must be recomputed, not left as raw memory
    for name in ("rope_cos", "rope_sin"):
        assert torch.equal(getattr(back.model, name), getattr(model.model, name)), name
    assert torch.equal(back.generate(ids, max_new_tokens=20, do_sample=False), before)
    for name, arr in mt.dump_arrays(wb.load(path, backend="torch")).items():  # the project's reader, same file
        np.testing.assert_array_equal(arr, mt.dump_arrays(model.model)[name])
    gen = json.loads((path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (256, 257, 257)


def test_from_pretrained_refuses_missing_tensors(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, path = saved
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    arrays = load_file(path / "model.safetensors")
    del arrays["embed.weight"]
    save_file(arrays, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="embed.weight: missing from the checkpoint"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


FRESH = textwrap.dedent("""
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    path, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    plain = PreTrainedTokenizerFast.from_pretrained(path)  # no config, no custom code at all
    ids = tok(["h\\u00e9llo", "loop!"], return_tensors="pt", padding=True)
    assert plain(["h\\u00e9llo", "loop!"], padding=True)["input_ids"] == ids["input_ids"].tolist()
    with torch.no_grad():
        hf = model(ids["input_ids"][1:]).logits.numpy()
    imported = sorted(m for m in sys.modules if m == "mythos" or m.startswith("mythos."))
    import weights_bridge, mythos_jax
    weights_bridge.enable_float64("jax")  # the directory is float64
    jx = weights_bridge.load(path, backend="jax")
    jax_logits = np.asarray(mythos_jax.forward(jx, ids["input_ids"][1:].numpy()).logits)
    np.savez(out, hf=hf, jax=jax_logits, ids=ids["input_ids"].numpy(), mask=ids["attention_mask"].numpy(),
             module=type(model).__module__, imported=",".join(imported))
""")


def test_a_fresh_offline_process_loads_the_directory_both_ways(tmp_path):
    """float64, so that the JAX twin's logits are held to parity's float64 bound."""
    model, path = MythosForCausalLM.from_twin(twin(BYTES, dtype="float64")), tmp_path / "m64"
    model.save_pretrained(path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "TRANSFORMERS_VERBOSITY": "error"}
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    run = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "out.npz")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    assert str(got["module"]).startswith("transformers_modules.") and str(got["imported"]) == ""
    bt = ByteTokenizer()
    assert got["ids"].tolist() == [bt.encode("héllo"), [257] + bt.encode("loop!")]  # left-padded with EOS
    assert got["mask"].tolist() == [[1] * 7, [0] + [1] * 6]
    with torch.no_grad():
        want = model.model(torch.from_numpy(got["ids"][1:])).logits.numpy()
    np.testing.assert_allclose(got["hf"], want, atol=1e-12, rtol=0)
    np.testing.assert_allclose(got["jax"], want, atol=1e-10, rtol=0)


def random_text(rng: random.Random) -> str:
    """Unicode from every plane (no surrogates), with the special tokens' own text now and then."""
    spans = ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF))
    chars = [chr(rng.randint(*rng.choice(spans))) for _ in range(rng.randint(0, 30))]
    if rng.random() < 0.2:
        chars.insert(rng.randint(0, len(chars)), rng.choice(["<|bos|>", "<|eos|>", " ", "\r\n"]))
    return "".join(chars)


def test_auto_tokenizer_equals_the_byte_tokenizer(saved):
    _, path = saved
    tok, bt = transformers.AutoTokenizer.from_pretrained(path), ByteTokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (256, 257, 257, "left")
    rng = random.Random(0)
    for _ in range(200):
        text = random_text(rng)
        ids = tok(text)["input_ids"]
        assert ids == bt.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == text
        junk = [rng.randint(0, 257) for _ in range(rng.randint(0, 20))]  # invalid UTF-8 too: U+FFFD the same way
        assert tok.decode(junk, skip_special_tokens=True) == bt.decode(junk), junk


# --------------------------------------------------------------------------- mythos export hf


def front_matter(readme: str) -> dict:
    head, _, _ = readme.removeprefix("---\n").partition("\n---\n")
    return yaml.safe_load(head)


def test_cli_export_writes_the_directory(tmp_path):
    results = {"results": {"mythos_mc": {"alias": "mythos_mc", "acc,none": 0.35, "acc_stderr,none": 0.1,
                                         "acc_norm,none": 0.4, "acc_norm_stderr,none": "N/A"}},
               "n-shot": {"mythos_mc": 0}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "nested" / "m"
    r = runner.invoke(app, ["export", "hf", "tiny", str(out), "--set", "vocab_size=258", "--dtype", "float64",
                            "--loops", "3", "--eval-results", str(tmp_path / "results.json")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # no temporary folder left beside it
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mythos" and cfg["n_loops"] == 3 and cfg["dtype"] == "float64"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_mythos.MythosForCausalLM"
    assert S.load(cfg["spec"]) == S.preset("tiny", {"vocab_size": 258})
    card = front_matter((out / "README.md").read_text())
    assert (card["library_name"], card["pipeline_tag"], card["license"]) == ("transformers", "text-generation", "mit")
    assert {"mythos", "moe", "gqa"} <= set(card["tags"])
    tw = wb.load(out, backend="torch")
    assert tw.embed.weight.dtype == torch.float64
    assert card["mythos"]["parameters"] == sum(p.numel() for p in tw.parameters())  # counted on the built model
    assert card["mythos"]["attention"].startswith("GQA, 4 heads, 2 KV heads")
    assert card["mythos"]["ffn"].startswith("MoE, 4 routed experts (top 2)")
    metrics = card["model-index"][0]["results"][0]
    assert metrics["dataset"]["name"] == "mythos_mc"
    assert [(m["type"], m["value"]) for m in metrics["metrics"]] == [("acc", 0.35), ("acc_norm", 0.4)]
    again = runner.invoke(app, ["export", "hf", "tiny", str(out), "--set", "vocab_size=258", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]


@pytest.mark.parametrize("args, message", [
    (["--dtype", "float16"], "--dtype 'float16' is not allowed"),
    (["--set", "attention.tpye=mla"], "unknown field attention.tpye"),
    (["--loops", "0"], "--loops=0 must be an integer"),
    (["--eval-results", "missing.json"], "--eval-results 'missing.json' is not a file"),
    (["--eval-results", "junk.json"], "no numeric metric found"),
])
def test_cli_export_refuses_bad_input_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.json").write_text(json.dumps({"results": {"task": {"acc,none": "high"}}}))
    r = runner.invoke(app, ["export", "hf", "tiny", "out", *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.json"]


def test_cli_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["export", "hf", "tiny", str(tmp_path)])
    assert r.exit_code == 2 and "is not empty; pass --overwrite" in " ".join(r.output.split()), r.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["export", "hf", "tiny", str(tmp_path / "file")])
    assert r.exit_code == 2 and "is a file, not a folder" in r.output, r.output


def test_a_small_vocabulary_exports_without_a_tokenizer(tmp_path):
    r = runner.invoke(app, ["export", "hf", "tiny", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "m" / "tokenizer.json").exists()
    assert "No tokenizer: vocab_size=64" in (tmp_path / "m" / "README.md").read_text()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["eos_token_id"] is None


def test_every_weights_command_reads_an_exported_directory(saved):
    """`mythos generate DIR` etc.: mythos.load resolves a directory to its model.safetensors."""
    from mythos.load import load_model, resolve

    model, path = saved
    src = resolve(path)
    assert src.weights == path / "model.safetensors" and src.spec == model.config.mythos_spec
    loaded = load_model(path, "torch")
    for name, a in mt.dump_arrays(loaded).items():
        np.testing.assert_array_equal(a, mt.dump_arrays(model.model)[name], err_msg=name)
    r = runner.invoke(app, ["generate", str(path), "--prompt", "hi", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
