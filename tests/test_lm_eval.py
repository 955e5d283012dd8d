"""lm-evaluation-harness: the `mythos` model (mythos/lm_eval_model.py), `mythos eval`, the shipped tasks.

The requests are the shipped tasks' own (built by lm-eval from mythos/eval_tasks), on the tiny preset
with vocab_size=258 (the byte tokenizer's ids). Expected values come from elsewhere: the other twin,
a full forward of the twin on the unpadded ids (log_softmax summed over the continuation), the same
model one request at a time, the twin's own greedy generate. Nothing is downloaded.
"""

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before lm-eval imports datasets and huggingface_hub
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'mythos[eval]')")

import spec as S
import weights_bridge as wb
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from typer.testing import CliRunner
from weights_bridge.backends import BACKENDS, forward, from_numpy, to_numpy, twin

from mythos.cli import app
from mythos.evaluate import SHIPPED_TASKS, run_eval, task_dir
from mythos.lm_eval_model import MythosLM

pytestmark = [pytest.mark.lmeval, pytest.mark.usefixtures("one_torch_thread")]

SETS = ["vocab_size=258"]
SPEC = S.load("tiny", overrides={"vocab_size": 258})
L = SPEC.max_seq_len  # 64: the rolling documents need two to four windows
BOS, EOS = 256, 257
TOL = {"float64": 1e-10, "float32": 1e-5}  # issue 12's bounds on the twins' log-likelihoods
runner = CliRunner()


@pytest.fixture(scope="module")
def requests_of(tmp_path_factory):
    """The shipped tasks' lm-eval Instances by task name (all documents)."""
    manager = TaskManager(include_path=str(task_dir(tmp_path_factory.mktemp("tasks"))), include_defaults=False)
    tasks = manager.load(list(SHIPPED_TASKS))["tasks"]
    for task in tasks.values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
    return {name: task.instances for name, task in tasks.items()}


@pytest.fixture(scope="module")
def lm():
    """lm(backend, dtype, batch_size, sets, seed): a MythosLM on tiny (vocab 258, seed 0 by default), built once."""
    built = {}

    def get(backend: str, dtype: str = "float64", batch_size: int = 4, sets: str = "vocab_size=258",
            seed: int = 0) -> MythosLM:
        key = (backend, dtype, batch_size, sets, seed)
        if key not in built:
            built[key] = MythosLM(source="tiny", sets=sets, backend=backend, dtype=dtype, batch_size=batch_size,
                                  seed=seed)
        return built[key]

    return get


def chosen(instances, lls) -> np.ndarray:
    """The choice with the highest log-likelihood per document of a multiple-choice task."""
    docs = sorted({i.doc_id for i in instances})
    best = {d: max((ll, -i.idx) for i, ll in zip(instances, lls) if i.doc_id == d) for d in docs}
    return np.array([-best[d][1] for d in docs])


def direct_logprob(model, backend: str, inp: list[int], targets: list[int]) -> tuple[float, bool]:
    """Sum of log_softmax of one unpadded forward of ``inp`` at its last len(targets) positions, and whether
    each of those positions' argmax is the target."""
    logits = to_numpy(forward(backend, model, np.asarray([inp], dtype=np.int64)).logits)[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    rows = logp[len(inp) - len(targets):]
    return float(rows[np.arange(len(targets)), targets].sum()), bool((rows.argmax(-1) == targets).all())


MIXED = [  # lengths from 2 to past max_seq_len, an empty context: padding and truncation differ per row
    ("", "Hello"), ("Hi", " there"), ("A much longer context that goes on for a while,", " ends"),
    ("x" * 80, " beyond max_seq_len: truncated on the left"), ("Q: What is 2 + 3?\nA:", " 5"), ("ab", "c"),
]


def mixed_requests() -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(MIXED)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_twins_equal_loglikelihoods_and_accuracy(lm, requests_of, dtype):
    """Both twins on the shipped multiple-choice and rolling requests: log-likelihoods within issue 12's
    bound, the same greedy flags, the same answer chosen for every question (so the same accuracy)."""
    mc, ppl = requests_of["mythos_mc"], requests_of["mythos_ppl"]
    got = {b: lm(b, dtype).loglikelihood(mc) for b in BACKENDS}
    ll = {b: np.array([r[0] for r in got[b]]) for b in BACKENDS}
    rolling = {b: np.array(lm(b, dtype).loglikelihood_rolling(ppl)) for b in BACKENDS}
    err, err_rolling = np.abs(ll["torch"] - ll["jax"]).max(), np.abs(rolling["torch"] - rolling["jax"]).max()
    print(f"{dtype}: max |ll diff| {err:.2e} over {len(mc)} requests, rolling {err_rolling:.2e} over {len(ppl)} docs")
    assert np.isfinite(ll["torch"]).all() and (ll["torch"] < 0).all() and (rolling["torch"] < 0).all()
    assert err <= TOL[dtype] and err_rolling <= TOL[dtype]
    assert [g for _, g in got["torch"]] == [g for _, g in got["jax"]]
    assert (chosen(mc, ll["torch"]) == chosen(mc, ll["jax"])).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loglikelihood_equals_full_forward(lm, requests_of, backend):
    """A continuation's log-likelihood is log_softmax of the twin's own forward on BOS + context +
    continuation (unpadded, built apart from the lm-eval model) summed over the continuation's tokens,
    and is_greedy says whether argmax gives each of them; also for a context beyond max_seq_len, whose
    left end is cut so that the continuation keeps L tokens of input."""
    model = twin(backend).build(SPEC, seed=0, dtype="float64")
    # jax compiles a forward per length: two lengths there (the truncated row has L), all of MIXED in torch
    reqs = requests_of["mythos_mc"][:8] + mixed_requests() if backend == "torch" else \
        requests_of["mythos_mc"][:4] + mixed_requests()[3:4]
    got = lm(backend).loglikelihood(reqs)
    for req, (ll, greedy) in zip(reqs, got):
        context, continuation = req.args
        ids = [BOS, *(context + continuation).encode()]
        cont = list(continuation.encode())
        want, want_greedy = direct_logprob(model, backend, ids[:-1][-L:], cont)
        assert abs(ll - want) <= 1e-10, (req.args, ll, want)
        assert greedy == want_greedy


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_one_at_a_time(lm, requests_of, backend):
    """batch_size 4 (rows of different lengths right-padded together) gives each request what batch_size 1 gives."""
    reqs = requests_of["mythos_mc"][:6] + mixed_requests()
    batched, solo = lm(backend, batch_size=4).loglikelihood(reqs), lm(backend, batch_size=1).loglikelihood(reqs)
    assert np.abs(np.array(batched)[:, 0] - np.array(solo)[:, 0]).max() <= 1e-10
    assert [g for _, g in batched] == [g for _, g in solo]
    ppl = requests_of["mythos_ppl"]
    assert np.allclose(lm(backend, batch_size=4).loglikelihood_rolling(ppl),
                       lm(backend, batch_size=1).loglikelihood_rolling(ppl), rtol=0, atol=1e-10)


def test_loglikelihood_rolling_equals_windows(lm, requests_of):
    """A document's rolling log-likelihood predicts every byte once: the first L from BOS and the bytes
    before them, each later block of up to L bytes from the L bytes before its last one."""
    model = twin("torch").build(SPEC, seed=0, dtype="float64")
    docs = [req.args[0] for req in requests_of["mythos_ppl"]]
    assert all(len(d.encode()) > L for d in docs)  # more than one window each
    got = lm("torch").loglikelihood_rolling(requests_of["mythos_ppl"])
    for doc, ll in zip(docs, got):
        toks = list(doc.encode())
        want = direct_logprob(model, "torch", [BOS, *toks[:L - 1]], toks[:L])[0]
        for start in range(L, len(toks), L):
            end = min(start + L, len(toks))
            want += direct_logprob(model, "torch", toks[end - 1 - L:end - 1], toks[start:end])[0]
        assert abs(ll - want) <= 1e-10


PROMPTS = ["Q: What is 2 + 3?\nA:", "Hi", "The loop runs the same block", "One, two,", "abc", "Z"]
# an untied head: the tied one of random weights repeats the last byte for ever, this one varies (seed 1)
GEN_SETS, GEN_SEED, N_NEW = "vocab_size=258;tie_embeddings=false", 1, 12


def find(ids: list[int], seq: list[int]) -> int:
    """The first index of seq in ids, or len(ids)."""
    return next((i for i in range(len(ids) - len(seq) + 1) if ids[i:i + len(seq)] == seq), len(ids))


@pytest.fixture(scope="module")
def greedy_cases(lm):
    """(prompt, new ids) of the torch twin's own greedy generate on BOS + prompt alone (up to EOS), and the
    stop strings: per prompt one or two ASCII bytes that first appear at a position >= 1 of its new ids.
    (The twins' greedy tokens are equal, tests/test_decode.py; the jax twin is checked against these.)"""
    model = lm("torch", batch_size=1, sets=GEN_SETS, seed=GEN_SEED)
    cases, stops = [], []
    for i, p in enumerate(PROMPTS):
        ids = np.asarray([[BOS, *p.encode()]])
        new = [int(t) for t in to_numpy(model.model.generate(ids, N_NEW, None, 0.0, None, None, 0, EOS))[0, ids.shape[1]:]]
        new = new[:new.index(EOS)] if EOS in new else new
        cases.append((p, new))
        w = 1 + i % 2
        k = next((k for k in range(1, len(new) - w + 1) if max(new[k:k + w]) < 128
                  and find(new[:k + w - 1], new[k:k + w]) == k + w - 1), None)
        if k is not None:
            stops.append(bytes(new[k:k + w]).decode())
    assert len(set(stops)) >= 3, "too few greedy continuations with a usable stop"
    return cases, sorted(set(stops))


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_until_stops_at_the_stop_string(lm, greedy_cases, backend, monkeypatch):
    """generate_until gives the twin's greedy tokens on each prompt alone, cut before the first of the stop
    strings (one or two bytes); each row's generation ends there (EOS after it); batch_size 4 (prompts of
    different lengths, left padded) and batch_size 1 give the same; a stop that never comes leaves
    max_gen_toks tokens. (jax: batch_size 4 only; each jax shape compiles.)"""
    cases, stops = greedy_cases
    stop_ids = [list(st.encode()) for st in stops]
    ends = [min(find(new, st) + len(st) for st in stop_ids) for _, new in cases]  # after the first stop's last byte
    want = [postcut(new, stops) for _, new in cases]
    assert sum(e <= len(new) for e, (_, new) in zip(ends, cases)) >= 3  # most rows do stop
    assert {w for w in want if w} and any(e > 1 for e in ends)  # not every answer is empty
    reqs = [Instance("generate_until", {}, (p, {"until": stops, "max_gen_toks": N_NEW}), i)
            for i, (p, _) in enumerate(cases)]

    returned, distinct = {}, []  # prompt -> the new ids the twin's generate returned for its row
    original = type(lm(backend, sets=GEN_SETS, seed=GEN_SEED).model).generate

    def spy(self, ids, *args, **kw):
        out = to_numpy(original(self, ids, *args, **kw))
        prompts = {lm("torch").tok.decode(row[mask == 1]) for row, mask in zip(to_numpy(ids), to_numpy(kw["attention_mask"]))}
        for row, mask, new in zip(to_numpy(ids), to_numpy(kw["attention_mask"]), out[:, -N_NEW:]):
            returned[lm("torch").tok.decode(row[mask == 1])] = new
        distinct.append(len(prompts))
        return out

    monkeypatch.setattr(type(lm(backend, sets=GEN_SETS, seed=GEN_SEED).model), "generate", spy)
    sizes = (1, 4) if backend == "torch" else (4,)
    for batch_size in sizes:
        returned.clear()
        distinct = []  # prompts per generate call
        assert lm(backend, batch_size=batch_size, sets=GEN_SETS, seed=GEN_SEED).generate_until(reqs) == want
        assert max(distinct) == batch_size  # batch_size 4: four prompts of different lengths in one call
        for (p, new), end in zip(cases, ends):
            if end <= len(new):
                assert (returned[p][end:] == EOS).all(), (p, returned[p])  # done at the stop: EOS after it
    monkeypatch.undo()
    if backend == "torch":
        p, new = cases[0]
        never = Instance("generate_until", {}, (p, {"until": ["never\x00"], "max_gen_toks": N_NEW}), 0)
        assert lm(backend, batch_size=1, sets=GEN_SETS, seed=GEN_SEED).generate_until([never]) == [
            lm("torch").tok.decode(new)]


def postcut(new: list[int], stops: list[str]) -> str:
    """The decoded new ids, up to the earliest occurrence of any stop string."""
    text = bytes(i for i in new if i < 256).decode("utf-8", errors="replace")
    return text[:min((text.find(st) for st in stops if st in text), default=len(text))]


def test_model_args(lm, requests_of, tmp_path):
    """lm-eval's own route (registry name "mythos", a model_args string) and a directory holding the weights
    file give the preset's log-likelihoods; unknown or bad model_args are refused by name."""
    reqs = requests_of["mythos_mc"][:8]
    want = np.array(lm("torch").loglikelihood(reqs))[:, 0]
    via_registry = get_model("mythos").create_from_arg_string(
        "source=tiny,sets=vocab_size=258,backend=torch,dtype=float64", {"batch_size": 2, "device": None})
    assert via_registry.batch_size == 2
    assert np.abs(np.array(via_registry.loglikelihood(reqs))[:, 0] - want).max() <= 1e-10
    wb.save(twin("torch").build(SPEC, seed=0, dtype="float64"), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    from_dir = MythosLM(source=str(tmp_path), backend="jax")  # the file's dtype, float64
    assert np.abs(np.array(from_dir.loglikelihood(reqs))[:, 0] - want).max() <= 1e-10
    for bad, words in [({"temperature": 1}, "unknown model_args"), ({"batch_size": 0}, "batch_size=0"),
                       ({"backend": "mxnet"}, "allowed: torch, jax"), ({"sets": None}, "vocab_size=64"),
                       ({"n_loops": 10_000}, "n_loops=10000")]:
        with pytest.raises(ValueError, match=words):
            MythosLM(**{"source": "tiny", "sets": "vocab_size=258", **bad})


def test_mythos_eval_cli(lm, requests_of, tmp_path):
    """`mythos eval` runs two shipped tasks offline on the jax twin, writes lm-eval's results JSON and prints the
    table; its accuracy is the one the model's own log-likelihoods give on the same 4 questions."""
    out = tmp_path / "results.json"
    r = runner.invoke(app, ["eval", "tiny", "--set", "vocab_size=258", "--tasks", "mythos_mc,mythos_gen", "--backend",
                            "jax", "--dtype", "float64", "--limit", "4", "--batch-size", "4", "--output", str(out)])
    assert r.exit_code == 0, r.output
    results = json.loads(out.read_text())
    assert results["n-samples"]["mythos_mc"]["effective"] == 4 and results["n-samples"]["mythos_gen"]["effective"] == 4
    mc = [i for i in requests_of["mythos_mc"] if i.doc_id < 4]
    ll = [x for x, _ in lm("jax").loglikelihood(mc)]
    answers = {i.doc_id: i.doc["answer"] for i in mc}
    acc = float(np.mean(chosen(mc, ll) == np.array([answers[d] for d in sorted(answers)])))
    assert results["results"]["mythos_mc"]["acc,none"] == acc
    assert results["config"]["model_args"]["backend"] == "jax"
    for word in ("mythos_mc", "acc", f"{acc:.4f}", "mythos_gen", "exact_match"):
        assert word in r.output


@pytest.mark.parametrize("args, words", [
    (["tiny", "--set", "vocab_size=258", "--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    (["tiny", "--set", "vocab_size=258", "--tasks", "mythos_mc", "--backend", "mxnet"], "--backend 'mxnet'"),
    (["missing.safetensors", "--tasks", "mythos_mc"], "does not exist"),
    (["tiny", "--tasks", "mythos_mc"], "vocab_size=64 is too small"),
    (["tiny", "--set", "vocab_size=258", "--tasks", "mythos_mc", "--limit", "0"], "--limit 0"),
    (["tiny", "--set", "vocab_size=258", "--tasks", " , "], "names no task"),
    (["EMPTY_DIR", "--tasks", "mythos_mc"], "holds no .safetensors"),
])
def test_mythos_eval_bad_input_exits_2(tmp_path, args, words):
    """Bad input: exit 2, one message naming it, no results file and no temporary file left."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "results.json"
    args = [str(tmp_path / "empty") if a == "EMPTY_DIR" else a for a in args]
    r = runner.invoke(app, ["eval", *args, "--output", str(out)])
    assert r.exit_code == 2, r.output
    assert words in " ".join(r.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def lm_eval_cli(monkeypatch, args: list[str]) -> dict:
    """`python -m mythos.lm_eval_model ARGS` (lm-eval's command line, the mythos model registered and the shipped
    tasks on --include_path), run in this process; lm-eval's results JSON it wrote under --output_path."""
    from mythos.lm_eval_model import main

    out = args[args.index("--output_path") + 1]
    monkeypatch.setattr(sys, "argv", sys.argv[:])  # main sets sys.argv for lm-eval's parser
    main(args)
    (written,) = Path(out).rglob("results_*.json")
    return json.loads(written.read_text())


def test_lm_eval_command_line(tmp_path, monkeypatch):
    """lm-eval's own command line with the mythos model (its default device cuda:0 falls back to the CPU)
    writes the accuracy that run_eval gives."""
    results = lm_eval_cli(monkeypatch, ["--model", "mythos", "--model_args", "source=tiny,sets=vocab_size=258,dtype=float64",
                                        "--tasks", "mythos_mc", "--limit", "6", "--output_path", str(tmp_path / "out")])
    want = run_eval("tiny", "mythos_mc", dtype="float64", limit=6, sets=SETS)["results"]["mythos_mc"]
    assert results["results"]["mythos_mc"]["acc,none"] == want["acc,none"]


def test_hf_route_same_accuracy(tmp_path):
    """lm-eval's `hf` model (`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`, here through
    simple_evaluate, the call its command line makes) on the directory `mythos export hf` writes gives the
    accuracies of the mythos model on that directory. The exported tokenizer prepends BOS: add_bos_token=True."""
    from mythos.hf import export  # [eval] includes [hf]: a broken export fails here, it is not skipped
    out_dir = tmp_path / "hf"
    export.export_hf("tiny", out_dir, sets=SETS, seed=0, dtype="float64")
    manager = TaskManager(include_path=str(task_dir(tmp_path / "tasks")), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={out_dir},trust_remote_code=True,add_bos_token=True,dtype=float64",
        tasks=["mythos_mc"], device="cpu", task_manager=manager, log_samples=False)
    hf = results["results"]["mythos_mc"]
    ours = run_eval(str(out_dir), "mythos_mc", dtype="float64")["results"]["mythos_mc"]
    assert hf["acc,none"] == ours["acc,none"] and hf["acc_norm,none"] == ours["acc_norm,none"]
