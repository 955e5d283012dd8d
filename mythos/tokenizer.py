"""A byte-level tokenizer: UTF-8 bytes 0..255 are the ids 0..255, then BOS and EOS. Nothing to download.

    >>> from mythos.tokenizer import ByteTokenizer
    >>> tok = ByteTokenizer.for_spec(spec.preset("bench-s-gqa"))   # a clear error if vocab_size < 258
    >>> ids = tok.encode("héllo")                                  # [BOS, 104, 195, 169, 108, 108, 111]
    >>> tok.decode(ids)                                            # 'héllo'

A model with random weights emits arbitrary bytes: `decode` replaces invalid UTF-8 with U+FFFD, and
`stream_decoder` turns ids into text as they come, holding back an incomplete multi-byte character.
"""

from __future__ import annotations

import codecs
from typing import Callable, Iterable

from spec import Spec

N_BYTES = 256


class ByteTokenizer:
    """Byte ids 0..255, `bos_id` = 256, `eos_id` = 257; ids >= 258 of a larger vocabulary decode to nothing."""

    bos_id = N_BYTES
    eos_id = N_BYTES + 1
    vocab_size = N_BYTES + 2  # the smallest vocabulary that holds every id

    @classmethod
    def for_spec(cls, s: Spec) -> ByteTokenizer:
        """The tokenizer for a spec, or a ValueError naming the field when its vocabulary is too small."""
        if s.vocab_size < cls.vocab_size:
            raise ValueError(f"vocab_size={s.vocab_size} is too small for the byte tokenizer: it needs "
                             f"{cls.vocab_size} ids (256 bytes + BOS + EOS); use a spec with "
                             f"vocab_size >= {cls.vocab_size} (e.g. --set vocab_size={cls.vocab_size})")
        return cls()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """The UTF-8 bytes of text as ids, with BOS first (and EOS last) when asked."""
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the byte ids (BOS, EOS and ids beyond them are skipped; invalid UTF-8 becomes U+FFFD)."""
        return bytes(i for i in map(int, ids) if 0 <= i < N_BYTES).decode("utf-8", errors="replace")

    def stream_decoder(self) -> Callable[[int], str]:
        """A function id -> the text it completes ('' while a multi-byte character is incomplete)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def feed(i: int) -> str:
            i = int(i)
            return decoder.decode(bytes([i])) if 0 <= i < N_BYTES else ""

        return feed
