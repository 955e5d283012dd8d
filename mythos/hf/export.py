"""`mythos export hf`: a spec or weights file to one Hugging Face directory, written atomically.

    >>> from mythos.hf.export import export_hf
    >>> info = export_hf("tiny", "out/tiny-hf", sets=["vocab_size=258"], eval_results="results.json")
    >>> info.files        # ('model.safetensors', 'config.json', 'generation_config.json', 'tokenizer.json', ...)

The directory (MythosForCausalLM.save_pretrained) is written into a temporary folder beside DIR and
renamed into place, so a reader sees no directory or the whole one; a DIR that exists and is not empty is
refused unless overwrite=True (then it is replaced as a whole, the old one removed after the rename).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import spec as S

from ..load import LoadError, check_choice, check_output_dir, load_model, resolve
from .hub_mythos import eval_metrics
from .modeling_mythos import MythosForCausalLM

DTYPES = ("float32", "float64", "bfloat16")
MAX_EVAL_BYTES = 64 * 1024 * 1024  # lm-eval's results JSON with samples logged stays well below this


class HFExportInfo(NamedTuple):
    path: Path  # the directory written
    files: tuple[str, ...]  # the names in it
    dtype: str
    n_loops: int | None  # the default loop count in config.json (None: recurrent.max_loop_iters)
    parameters: int  # spec.count_params(...)["total"]
    tokenizer: bool  # tokenizer.json written (vocab_size >= 258)
    eval_metrics: int  # evaluation results in the model card


def read_eval_results(source: str | os.PathLike | Mapping) -> Mapping:
    """lm-eval's results: a mapping as given, or the JSON file lm-eval wrote; checked by eval_metrics (LoadError)."""
    if isinstance(source, Mapping):
        results = source
    else:
        path = Path(source)
        try:
            if not path.is_file():
                raise LoadError(f"--eval-results {str(path)!r} is not a file (give lm-eval's results JSON)")
            if path.stat().st_size > MAX_EVAL_BYTES:
                raise LoadError(f"--eval-results {str(path)!r} is larger than {MAX_EVAL_BYTES} bytes")
            results = json.loads(path.read_text(encoding="utf-8"))
        except LoadError:
            raise
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise LoadError(f"--eval-results {str(path)!r} is not a readable JSON file: {e}") from None
    try:
        eval_metrics(results)
    except ValueError as e:
        raise LoadError(f"--eval-results: {e}") from None
    return results


def export_hf(source: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32", seed: int = 0,
              sets: Sequence[str] = (), n_loops: int | None = None,
              eval_results: str | os.PathLike | Mapping | None = None, overwrite: bool = False,
              license: str = "mit") -> HFExportInfo:
    """Write a spec (random weights from seed) or a weights file as one Hugging Face directory.

    Args:
        source: a preset, a spec .yaml or a .safetensors weights file (mythos.load_model).
        out_dir: the directory; created with its parents; an existing non-empty one only with overwrite.
        dtype: float32 | float64 | bfloat16.
        seed, sets: the random weights' seed and spec overrides (a spec only).
        n_loops: the default loop count written to config.json (None: recurrent.max_loop_iters).
        eval_results: lm-eval's results (its JSON file or the loaded mapping) for the model card's model-index.
        overwrite: replace a non-empty out_dir.
        license: the model card's license (default mit, the project's).
    Returns:
        HFExportInfo(path, files, dtype, n_loops, parameters, tokenizer, eval_metrics).
    Raises:
        LoadError, SpecError, BridgeError: bad input, before anything is written.
    """
    check_choice("--dtype", dtype, DTYPES)
    src = resolve(source, sets)  # a bad source is refused before anything is built or written
    if n_loops is not None:
        try:
            n_loops = S.check_loops(src.spec, n_loops, what="--loops")
        except S.SpecError as e:
            raise LoadError(str(e)) from None
    if not isinstance(license, str) or not license.strip() or "\n" in license:
        raise LoadError(f"--license {license!r} must be one line of text (a Hub license id such as mit, apache-2.0)")
    results = None if eval_results is None else read_eval_results(eval_results)
    out = check_output_dir(out_dir, "DIR")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LoadError(f"DIR {str(out)!r} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    model = MythosForCausalLM.from_twin(load_model(source, "torch", dtype=dtype, seed=seed, sets=sets), n_loops)

    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = out.with_name(f".{out.name}.{tag}.tmp")
    old = out.with_name(f".{out.name}.{tag}.old")
    try:
        files = model.save_pretrained(tmp, eval_results=results, name=out.name, license=license)
        if out.is_dir() and any(out.iterdir()):
            os.rename(out, old)  # overwrite: the old directory steps aside, then the new one takes its name
        os.replace(tmp, out)  # onto an absent or empty directory
    except BaseException:
        if old.exists() and not out.exists():
            os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    s = model.model.spec
    return HFExportInfo(out, tuple(files), dtype, n_loops, S.count_params(s)["total"], "tokenizer.json" in files,
                        0 if results is None else len(eval_metrics(results)))
