"""The vLLM plugin (mythos/vllm_plugin.py) against the project's own decoding: greedy tokens from vLLM's engine
(paged attention per (pass, layer), continuous batching, prefix caching, chunked prefill) equal
``Mythos.generate``'s for each request alone; what the plugin cannot serve is refused at load.

Runs in .venv-vllm only (conftest.py): .venv-vllm/bin/python -m pytest -q -m vllm tests/vllm -p no:cacheprovider
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import numpy as np
import pytest
import torch

import spec as S

# a tiny looped model vLLM's CPU attention can serve: head_dim = 64 / 2 = 32, float32; init.std 0.1 gives
# decisive logits and tokens that halt at different loop steps (counts 2, 3 and 4 of N = 4)
OVERRIDES = {"vocab_size": 258, "dim": 64, "attention.n_heads": 2, "attention.n_kv_heads": 1, "max_seq_len": 128,
             "init.std": 0.1}
SETS = [f"{k}={v}" for k, v in OVERRIDES.items()]  # `mythos export hf --set`
BLOCK = 32  # vLLM CPU's block size (a multiple of 32)
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=128, seed=0,
              kv_cache_memory_bytes=64 << 20, block_size=BLOCK)


def _prompts(rng: np.random.Generator, lengths: list[int]) -> list[list[int]]:
    return [rng.integers(0, 256, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mythos export hf tiny DIR --set ...` (float32, random weights of seed 0, default N = max_loop_iters = 4)."""
    from mythos.hf import export_hf

    out = tmp_path_factory.mktemp("vllm") / "tiny-hf"
    export_hf("tiny", out, sets=SETS, dtype="float32")
    return out


@pytest.fixture(scope="module")
def twin(export: Path):
    import weights_bridge

    return weights_bridge.load(export / "model.safetensors", backend="torch")


def _reference(twin, prompt: list[int], max_tokens: int, n_loops: int) -> list[int]:
    """The project's greedy decode of one request alone."""
    out = twin.generate(torch.tensor([prompt]), max_tokens, n_loops=n_loops)
    return out[0, len(prompt):].tolist()


def _engine(path: Path, **kw):
    from vllm import LLM

    return LLM(str(path), **{**ENGINE, **kw})


def _close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def test_batched_prompts_equal_generate(export: Path, twin) -> None:
    """Three prompts of different lengths in one batch: vLLM's greedy tokens are generate's, one paged
    Attention layer per (pass, layer) holds a KV cache, and the ACT halts at different steps in these prompts."""
    rng = np.random.default_rng(1)
    prompts = _prompts(rng, [3, 20, 41])
    N = 4  # config.json: n_loops unset -> recurrent.max_loop_iters
    llm = _engine(export, max_num_seqs=4)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(12), use_tqdm=False)
        layers = llm.apply_model(lambda m: (m.n_loops, len(m.paged),
                                            sum(1 for a in m.paged if a.kv_cache is not None and a.kv_cache.numel())))
    finally:
        _close(llm)
    s = twin.spec
    assert layers == [(N, s.prelude_layers + N + s.coda_layers, s.prelude_layers + N + s.coda_layers)]
    for p, o in zip(prompts, outs):
        got = list(o.outputs[0].token_ids)
        assert got == _reference(twin, p, 12, N), f"prompt of {len(p)} tokens"
    counts = twin(torch.tensor([prompts[2]]), N).loop_counts
    assert len(set(counts.flatten().tolist())) >= 2, "the test model should halt tokens at different loop steps"


def test_requests_join_and_leave(export: Path, twin) -> None:
    """Eight requests arriving every third engine step through max_num_seqs=3, with prefix caching (three share a
    two-block prefix), chunked prefill (a 90-token prompt in 32-token chunks) and one request cancelled after its
    second token; N = 6 for the whole engine (hf_overrides): every request's tokens are its solo generate's."""
    from vllm import SamplingParams

    rng = np.random.default_rng(2)
    shared = rng.integers(0, 256, size=2 * BLOCK).tolist()
    prompts = _prompts(rng, [5, 90, 17, 1, 33]) + [shared + [7, 8, 9], shared + [1], shared + [2, 3, 4, 5]]
    max_tokens = [9, 6, 14, 3, 11, 8, 5, 10]
    cancel = "2"  # aborted once it has two tokens (of 14)
    N = 6
    llm = _engine(export, hf_overrides={"n_loops": N}, max_num_seqs=3, enable_prefix_caching=True,
                  enable_chunked_prefill=True, max_num_batched_tokens=BLOCK)
    engine = llm.llm_engine
    sc = engine.vllm_config.scheduler_config
    assert (sc.max_num_seqs, sc.max_num_batched_tokens, sc.enable_chunked_prefill) == (3, BLOCK, True)
    assert engine.vllm_config.cache_config.enable_prefix_caching
    latest: dict[str, object] = {}  # request id -> its latest output (cumulative tokens)
    pending = list(range(len(prompts)))
    steps, aborted, overlap, finished_before_arrival = 0, False, 0, False
    try:
        while pending or engine.has_unfinished_requests():
            finished_before_arrival |= bool(pending) and any(o.finished for o in latest.values())
            if pending and steps % 3 == 0:  # arrivals while earlier requests prefill, decode and finish
                i = pending.pop(0)
                engine.add_request(str(i), {"prompt_token_ids": prompts[i]},
                                   SamplingParams(temperature=0.0, max_tokens=max_tokens[i], ignore_eos=True,
                                                  detokenize=False))
            outs = engine.step()
            overlap = max(overlap, len(outs))
            for out in outs:
                latest[out.request_id] = out
            if not aborted and cancel in latest and len(latest[cancel].outputs[0].token_ids) >= 2:
                engine.abort_request([cancel])
                aborted = True
            steps += 1
            assert steps < 500, "the engine did not finish its requests"
    finally:
        _close(llm)
    assert aborted and overlap >= 2 and finished_before_arrival  # requests ran together, joined and left
    for i, p in enumerate(prompts):
        out = latest[str(i)]
        got = list(out.outputs[0].token_ids)
        want = _reference(twin, p, max_tokens[i], N)
        if str(i) == cancel:  # cancelled: the tokens it had are generate's first ones
            assert 2 <= len(got) < len(want) and got == want[:len(got)]
        else:
            assert out.finished and got == want, f"request {i} ({len(p)} prompt tokens)"
    # the later requests of the shared prefix found its two blocks cached
    assert max(latest[str(i)].num_cached_tokens or 0 for i in (6, 7)) >= 2 * BLOCK
    # N matters: the engine's N = 6 tokens differ from N = 4 for some request
    assert any(_reference(twin, p, max_tokens[i], 4) != _reference(twin, p, max_tokens[i], N)
               for i, p in enumerate(prompts))


# --- refusals: check_servable directly, and one through the engine's load ---------------------------------------

def _spec(**sections) -> S.Spec:
    s = S.preset("tiny", OVERRIDES)
    return dataclasses.replace(s, **sections) if sections else s


def test_refusals_name_the_field() -> None:
    from mythos.vllm_plugin import check_servable, cpu_head_sizes

    sizes = cpu_head_sizes()
    assert sizes is not None and 32 in sizes and 8 not in sizes  # this venv runs vLLM's CPU platform
    s = _spec()
    assert check_servable(s, 4, torch.float32, head_sizes=sizes) == 4  # the test model is servable
    mla = S.preset("tiny", {**OVERRIDES, "attention.type": "mla"})
    cases = [
        (mla, {}, "attention.type: mla"),
        (dataclasses.replace(s, recurrent=dataclasses.replace(
            s.recurrent, compressor=dataclasses.replace(s.recurrent.compressor, enabled=True))), {},
         "recurrent.compressor.enabled"),
        (dataclasses.replace(s, decode=dataclasses.replace(s.decode, halted_kv="freeze")), {},
         "decode.halted_kv: freeze"),
        (S.preset("tiny"), {}, "head_dim = dim / attention.n_heads = 32 / 4 = 8"),
        (s, {"dtype": torch.float64}, "dtype float64"),
        (s, {"n_loops": 0}, "n_loops"),
        (s, {"tensor_parallel": 2}, "tensor_parallel_size=2"),
        (s, {"quantization": "fp8"}, "quantization='fp8'"),
        (s, {"max_model_len": 256}, "max_model_len=256 exceeds the spec's max_seq_len=128"),
    ]
    for spec_, kw, message in cases:
        args = {"n_loops": 4, "dtype": torch.float32, **kw}
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_servable(spec_, args.pop("n_loops"), args.pop("dtype"), head_sizes=sizes, **args)


def test_engine_refuses_mla_at_load(tmp_path: Path) -> None:
    """An MLA export: the engine fails while loading the model, with the plugin's message."""
    from mythos.hf import export_hf

    out = tmp_path / "mla-hf"
    export_hf("tiny", out, sets=[*SETS, "attention.type=mla"], dtype="float32")
    with pytest.raises(Exception) as err:
        _engine(out, max_num_seqs=2)
    chain, e = [], err.value
    while e is not None:  # vLLM may wrap the model's ValueError
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("attention.type: mla is not served by the vLLM plugin" in m for m in chain), chain
