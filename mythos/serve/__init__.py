"""Serving Mythos models: the continuous-batching engine on the paged KV cache (docs/serving.md).

    >>> from mythos.serve import Engine, SamplingParams
    >>> engine = Engine(model, max_num_seqs=8, block_size=16)
    >>> engine.run([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=8))
"""

from .engine import Engine, EngineLoop, Event, RequestStream, SamplingParams

__all__ = ["Engine", "SamplingParams", "Event", "EngineLoop", "RequestStream"]
