"""The `mythos` model of lm-evaluation-harness (0.4.13): either twin behind lm-eval's TemplateLM.

    >>> import mythos.lm_eval_model                        # registers the model "mythos" with lm-eval
    >>> import lm_eval
    >>> lm_eval.simple_evaluate(model="mythos", model_args="source=tiny,sets=vocab_size=258,backend=jax",
    ...                         tasks=["mythos_mc"], task_manager=...)   # mythos.evaluate.run_eval does all this

    python -m mythos.lm_eval_model --model mythos --model_args source=m.safetensors,backend=jax --tasks mythos_mc

lm-eval 0.4.13 finds models only among its own modules and the ones imported before it runs (no entry
points), so this module's `main` is lm-eval's command line with this module imported and the shipped
tasks (mythos/eval_tasks, see mythos.evaluate.task_dir) on --include_path.

Text is tokenized by mythos.tokenizer.ByteTokenizer: every request starts with BOS (lm-eval's prefix
token), the way `mythos generate` feeds a prompt. Scoring is batched with right padding (attention is
causal, so pads after a row change none of its logits); generation is batched with left padding and an
attention mask (the twins' generate). Rows are padded to a power-of-two length (at least 16, at most
max_seq_len) and every batch to batch_size rows, so the jax twin compiles one program per shape.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import lm_eval.models  # noqa: F401  lm-eval's own models ("hf", ...): get_model adds them only to an empty registry
import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

import spec as S
from weights_bridge import backends

from .load import WEIGHTS_SUFFIX, LoadError, check_choice, load_model, resolve
from .tokenizer import ByteTokenizer

log = logging.getLogger(__name__)  # lm-eval's own loggers are per module too
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")  # what generate_until honours
MAX_TOKENS_ALIASES = ("max_new_tokens", "max_tokens", "max_completion_tokens")  # normalize_gen_kwargs reads these too
MIN_BUCKET = 16  # the shortest padded row


def weights_in_dir(folder: Path) -> Path:
    """The one .safetensors file of a directory (an HF directory written by `mythos export hf`), or a LoadError."""
    files = sorted(folder.glob(f"*{WEIGHTS_SUFFIX}"))
    if len(files) != 1:
        what = (f"holds no {WEIGHTS_SUFFIX} file" if not files else
                f"holds {len(files)} {WEIGHTS_SUFFIX} files ({', '.join(f.name for f in files)}), not one")
        raise LoadError(f"source directory {str(folder)!r} {what}; give a directory written by `mythos export hf`, "
                        "a weights file, a preset or a spec .yaml")
    return files[0]


def parse_sets(sets: str | Sequence[str] | None) -> list[str]:
    """Spec overrides from model_args (``sets=vocab_size=258;dim=64``: lm-eval splits model_args at commas) or a list."""
    if sets is None:
        return []
    if isinstance(sets, str):
        return [s.strip() for s in sets.split(";") if s.strip()]
    return [str(s) for s in sets]


def positive_int(name: str, value: object) -> int:
    """An integer >= 1 given as an int or a decimal string, else a ValueError naming model_args ``name``."""
    try:
        ok = not isinstance(value, (bool, float)) and int(value) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return int(value)


def bucket(n: int, limit: int) -> int:
    """n rounded up to a power of two (at least MIN_BUCKET), at most limit: few shapes, few jax compilations."""
    return min(limit, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


def pad_rows(rows: Sequence[Sequence[int]], length: int, n_rows: int, pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_rows, length) int64 ids and 0/1 mask: each row padded on ``side``, then copies of row 0 up to n_rows."""
    rows = list(rows) + [rows[0]] * (n_rows - len(rows))
    ids = np.full((n_rows, length), pad_id, dtype=np.int64)
    mask = np.zeros((n_rows, length), dtype=np.int64)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(length - len(r), length)
        ids[i, span] = r
        mask[i, span] = 1
    return ids, mask


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    x = backends.widen(x).astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@register_model("mythos")
class MythosLM(TemplateLM):
    """A Mythos model of either twin for lm-eval: loglikelihood, loglikelihood_rolling and generate_until.

    model_args (all optional, as ``key=value`` pairs; lm-eval passes batch_size and device itself):
        source: a preset (default ``tiny``), a spec .yaml (random weights from ``seed``), a ``.safetensors``
            weights file, or a directory written by ``mythos export hf`` (its .safetensors file is read).
        backend: ``torch`` (default) or ``jax``.
        dtype: float32 | float64 | bfloat16 (default: the file's, float32 for a spec).
        n_loops: loop steps per token (default: the spec's max_loop_iters).
        batch_size: rows per forward / per generate call (default 1).
        seed: seed of the random weights for a spec source, and of sampling when a task samples.
        sets: spec overrides for a spec source, ``;``-separated: ``sets=vocab_size=258;dim=64``.
        max_gen_toks: new tokens when a task does not say (default 256, at most max_seq_len - 1).
        device: torch: move the model there (``cuda:0``; without CUDA it stays on the CPU, with a warning);
            jax runs on its default device. max_batch_size (lm-eval's, for batch_size=auto) is ignored.
    """

    def __init__(self, source: str = "tiny", backend: str = "torch", dtype: str | None = None,
                 n_loops: int | None = None, batch_size: int | str = 1, seed: int = 0,
                 sets: str | Sequence[str] | None = None, max_gen_toks: int = 256, device: str | None = None,
                 max_batch_size: int | None = None, **unknown: object) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args for the mythos model: {', '.join(sorted(unknown))}; allowed: "
                             "source, backend, dtype, n_loops, batch_size, seed, sets, max_gen_toks, device")
        check_choice("backend", backend, backends.BACKENDS)
        if dtype is not None:
            check_choice("dtype", dtype, backends.DTYPES)
        self.batch_size = positive_int("batch_size", batch_size)
        self.max_gen_toks = positive_int("max_gen_toks", max_gen_toks)
        self.seed = int(seed)
        if Path(str(source)).is_dir():
            source = weights_in_dir(Path(str(source)))
        sets = parse_sets(sets)
        src = resolve(source, sets)  # the spec alone (a file: its header), so every check comes before the weights
        self.tok = ByteTokenizer.for_spec(src.spec)
        self.n_loops = None if n_loops is None else S.check_loops(src.spec, n_loops)
        self.model = load_model(source, backend, dtype, self.seed, sets)
        if backend == "torch" and device not in (None, "cpu"):
            import torch

            if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI default: cuda:0
                log.warning(f"device={device!r}: no CUDA device here, the torch twin stays on the CPU")
            else:
                self.model.to(device)
        self.spec = self.model.spec
        self.backend_name = backend
        self.source = str(source)

    # -- what TemplateLM asks for -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # an empty context (and each rolling document) is conditioned on BOS

    @property
    def max_length(self) -> int:
        return self.spec.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return "mythos-byte"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        """The UTF-8 bytes of string, BOS first unless add_special_tokens is False (BOS is never a byte)."""
        return self.tok.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, ids: Sequence[int], **kwargs: object) -> str:
        return self.tok.decode(ids)

    # -- scoring ------------------------------------------------------------------------------------

    def _logprobs(self, rows: list[list[int]], spans: list[tuple[int, int]]) -> list[np.ndarray]:
        """log_softmax (float64) of the logits at positions [a, b) of each row: one right-padded forward."""
        ids, _ = pad_rows(rows, bucket(max(map(len, rows)), self.max_length), self.batch_size, self.tok.eos_id, "right")
        out = backends.forward(self.backend_name, self.model, ids, self.n_loops)
        logits = backends.to_numpy(out.logits)  # (B, T, V)
        return [log_softmax(logits[i, a:b]) for i, (a, b) in enumerate(spans)]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: object) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per request.

        Sorted longest first (as lm-eval's HF model does), batch_size rows per forward, results in the
        order given. A context plus continuation longer than max_seq_len + 1 loses tokens on the left.
        """
        L = self.max_length

        def longest_first(req: tuple) -> tuple:
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        order = Collator(requests, sort_fn=longest_first)
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in order.get_batched(n=self.batch_size):
            rows, spans, conts = [], [], []
            for _, context, continuation in chunk:
                if not continuation:
                    raise ValueError("a loglikelihood request with an empty continuation")
                if len(continuation) > L:
                    raise ValueError(f"a continuation of {len(continuation)} tokens is longer than max_seq_len={L}")
                row = (context + continuation)[-(L + 1):][:-1]  # the input predicts every token after the first
                rows.append(row)
                spans.append((len(row) - len(continuation), len(row)))
                conts.append(np.asarray(continuation))
            for (key, _, _), lp, cont in zip(chunk, self._logprobs(rows, spans), conts):
                answer = (float(lp[np.arange(len(cont)), cont].sum()), bool((lp.argmax(-1) == cont).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(chunk))
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log P(document) per request: windows of max_seq_len tokens (lm-eval's get_rolling_token_windows,
        BOS before the first), each predicting only tokens no earlier window predicted."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text, add_special_tokens=False), self.prefix_token_id, self.max_length, 1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # -- generation ---------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations, cut before the first stop string.

        Requests with the same generation kwargs go together, longest first, batch_size per call of the
        twin's generate (left padded, with the attention mask); each row stops at a stop string, at EOS or
        after max_gen_toks new tokens. A context longer than max_seq_len - max_gen_toks loses tokens on the left.
        """
        L = self.max_length
        order = Collator([req.args for req in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        results: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            unsupported = sorted(set(all_kwargs[0]) - set(GEN_KWARGS) - set(MAX_TOKENS_ALIASES))
            if unsupported:
                raise ValueError(f"generation kwargs {', '.join(unsupported)} are not supported by the mythos model; "
                                 f"supported: {', '.join(GEN_KWARGS)}")
            kw = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kw.get("until"), eos=None) if s]
            n_new = int(kw["max_gen_toks"])
            if not 1 <= n_new < L:
                raise ValueError(f"max_gen_toks={n_new} must lie in 1..max_seq_len-1={L - 1}: the context needs "
                                 "room in max_seq_len (set it in the task's generation_kwargs or model_args)")
            encoded = [self.tok_encode(c)[-(L - n_new):] for c in contexts]
            T = min(bucket(max(map(len, encoded)), L), L - n_new)
            ids, mask = pad_rows(encoded, T, self.batch_size, self.tok.eos_id, "left")
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            top_k, top_p = (kw.get("top_k"), kw.get("top_p")) if temperature > 0 else (None, None)
            out = self.model.generate(
                backends.from_numpy(self.backend_name, ids), n_new, self.n_loops, temperature, top_k, top_p,
                self.seed, self.tok.eos_id,
                attention_mask=backends.from_numpy(self.backend_name, mask),
                stop=[self.tok.encode(s, bos=False) for s in until])
            new = backends.to_numpy(out)[:, T:]  # (B, n_new): EOS (or -1) after a row stopped
            for (context, gen_kwargs), row in zip(chunk, new):
                text = postprocess_generated_text(self.tok.decode(row), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(chunk))
        bar.close()
        return order.get_original(results)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the mythos model registered and the shipped tasks on --include_path
    (unless one is given), offline: ``python -m mythos.lm_eval_model --model mythos --model_args ... --tasks ...``."""
    import tempfile

    from lm_eval.__main__ import cli_evaluate

    from .evaluate import go_offline, task_dir

    go_offline()
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="mythos-eval-tasks-") as tmp:
        if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
            argv += ["--include_path", str(task_dir(tmp))]
        sys.argv = ["lm-eval", *argv]
        cli_evaluate()


if __name__ == "__main__":
    main()
