"""Packing documents into fixed-length token windows: `pack_sequences` and `batch_sequences`.

Rule `bos-every-window` (PACKING_RULE, recorded in store.json): the token stream

    stream = [BOS] doc_0 [EOS] [BOS] doc_1 [EOS] ...

is cut into windows of `max_length` that each start with BOS, as every text a deployed model reads
does:

    window_i = [BOS] + the next max_length - 1 stream tokens      (a stream BOS that would open the
                                                                    window is the window's BOS)

so a document continues across windows after a fresh BOS; the last window is right-padded with PAD
(attention_mask 0). Without it, a window that starts mid-document turns its first token into an
attention sink whose activation is ~100x the median norm. keep_mask marks the positions whose
activations are stored: not BOS, not padding, unless keep_special. A tokenizer without a BOS uses
its EOS in that place (`models.tokenizer_info` falls back to it), the usual document separator.
Tokenises lazily, a few documents at a time. The tokenizer is passed in (no `transformers` here).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from saelab.errors import UsageError

PACKING_RULE = "bos-every-window"
"""The packing rule's name in store.json (`packing`); stores without it were packed with BOS only at
document starts and are read with a warning, never appended to."""

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PackedSequence:
    """One window of the packed token stream."""

    index: int
    """Position of this window in the packed corpus (0, 1, 2, ...)."""
    input_ids: np.ndarray
    """int32 [max_length] token ids."""
    attention_mask: np.ndarray
    """int32 [max_length]: 1 for tokens, 0 for padding."""
    keep_mask: np.ndarray
    """bool [max_length]: positions whose activations are stored (not BOS, not padding)."""


class SequenceBatch(NamedTuple):
    """Packed sequences stacked for one forward pass."""

    input_ids_BS: "torch.Tensor"
    """int64 token ids."""
    attention_mask_BS: "torch.Tensor"
    """int64: 1 for tokens, 0 for padding."""
    keep_mask_BS: "torch.Tensor"
    """bool: positions a store keeps (not BOS, not padding, unless keep_special)."""
    index_B: np.ndarray
    """int64 position of each sequence in the packed corpus."""


def batch_sequences(sequences: Iterable[PackedSequence], batch_size: int) -> Iterator[SequenceBatch]:
    """Stack packed sequences `batch_size` at a time (the last batch may be smaller)."""
    import torch

    it = iter(sequences)
    while seqs := list(itertools.islice(it, batch_size)):
        yield SequenceBatch(
            torch.as_tensor(np.stack([s.input_ids for s in seqs]), dtype=torch.long),
            torch.as_tensor(np.stack([s.attention_mask for s in seqs]), dtype=torch.long),
            torch.as_tensor(np.stack([s.keep_mask for s in seqs]), dtype=torch.bool),
            np.asarray([s.index for s in seqs], dtype=np.int64),
        )


def _token_lists(documents: Iterable[str], tokenizer, batch_chars: int = 1 << 18) -> Iterator[list[int]]:
    """Token ids of each non-empty document, tokenised a few documents at a time (fast tokenizers
    encode a batch in parallel). `tokenizer(list[str], add_special_tokens=False)["input_ids"]`."""
    batch: list[str] = []
    size = 0

    def flush():
        if batch:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch.clear()

    for doc in documents:
        if not doc or not doc.strip():
            continue
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars or len(batch) >= 64:
            yield from flush()
            size = 0
    yield from flush()


def pack_sequences(documents: Iterable[str], tokenizer, max_length: int, bos_id: int, eos_id: int,
                   pad_id: int, keep_special: bool = False) -> Iterator[PackedSequence]:
    """Pack documents into fixed-length windows (see the module docstring for the equations).

    Args:
        documents: texts in order; empty ones are skipped.
        tokenizer: a `transformers` tokenizer (called on a list of strings with add_special_tokens=False).
        max_length: tokens per window.
        bos_id, eos_id, pad_id: special token ids placed between documents and after the end.
        keep_special: keep BOS and padding positions in keep_mask too.
    Yields:
        PackedSequence windows; documents longer than max_length span several.
    Raises:
        UsageError: max_length < 2, or the corpus holds no tokens at all.
    """
    if max_length < 2:
        raise UsageError(f"max_length must be at least 2, got {max_length}.")
    # BOS is recognised by its place in the stream, not by its id: a tokenizer with bos == eos
    # must still keep its EOS tokens.
    buf: list[int] = []
    bos_flags: list[bool] = []
    index = 0

    def window() -> PackedSequence:
        if bos_flags and bos_flags[0]:  # the stream's own BOS opens this window
            del buf[0], bos_flags[0]
        n_real = 1 + min(len(buf), max_length - 1)
        ids = [bos_id] + buf[: n_real - 1]
        flags = [True] + bos_flags[: n_real - 1]
        del buf[: n_real - 1], bos_flags[: n_real - 1]
        input_ids = np.full(max_length, pad_id, dtype=np.int32)
        input_ids[:n_real] = ids
        attention_mask = np.zeros(max_length, dtype=np.int32)
        attention_mask[:n_real] = 1
        if keep_special:
            keep_mask = np.ones(max_length, dtype=bool)
        else:
            keep_mask = attention_mask.astype(bool)
            keep_mask[:n_real] &= ~np.asarray(flags, dtype=bool)
        return PackedSequence(index=index, input_ids=input_ids, attention_mask=attention_mask,
                              keep_mask=keep_mask)

    def full() -> bool:  # enough stream for a whole window after its BOS
        return len(buf) - (1 if bos_flags and bos_flags[0] else 0) >= max_length - 1

    for ids in _token_lists(documents, tokenizer):
        buf.append(bos_id)
        buf.extend(ids)
        buf.append(eos_id)
        bos_flags.append(True)
        bos_flags.extend([False] * (len(ids) + 1))
        while full():
            yield window()
            index += 1
    if any(not f for f in bos_flags):  # real tokens left: one last, padded window
        yield window()
        index += 1
    if index == 0:
        raise UsageError("the corpus holds no text: every document is empty. Check --corpus "
                         "(and --text-field / --text-template for JSONL and Parquet).")


def pack_corpus(corpus, tokenizer, special: dict, cfg) -> Iterator[PackedSequence]:
    """`pack_sequences` of a corpus with the packing of a CorpusConfig (`max_length`, `keep_special`)
    and the special ids of `special` (`models.tokenizer_info` or a store's `tokenizer` entry)."""
    docs = corpus.documents(cfg.document_seed if cfg.shuffle_documents else None)
    return pack_sequences(docs, tokenizer, cfg.max_length, bos_id=special["bos_id"],
                          eos_id=special["eos_id"], pad_id=special["pad_id"], keep_special=cfg.keep_special)
