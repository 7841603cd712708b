"""Text corpora: find documents, stream them in a fixed order, pack their tokens into sequences.

Modules:
  config.py   `CorpusConfig`: --corpus, --text-field, --text-template, --max-length, --keep-special
  readers.py  `resolve_corpus(spec) -> Corpus`: text files, folders, JSONL, Parquet, built-ins, hf:
  packing.py  `pack_sequences` (BOS/EOS-separated windows of max_length) and `batch_sequences`
  builtin.py  `fetch_corpus`, `list_corpora`: the built-in corpora, fetched on request

Leaves out: model loading (the tokenizer is passed in; no `transformers` import here), deduplication.
"""
from saelab.corpus.builtin import BUILTINS, Builtin, CorpusStatus, builtin_path, fetch_corpus, list_corpora
from saelab.corpus.config import CorpusConfig
from saelab.corpus.packing import (PACKING_RULE, PackedSequence, SequenceBatch, batch_sequences, pack_corpus,
                                   pack_sequences)
from saelab.corpus.readers import Corpus, open_corpus, resolve_corpus

__all__ = ["BUILTINS", "PACKING_RULE", "Builtin", "Corpus", "CorpusConfig", "CorpusStatus", "PackedSequence",
           "SequenceBatch", "batch_sequences", "builtin_path", "fetch_corpus", "list_corpora", "open_corpus",
           "pack_corpus", "pack_sequences", "resolve_corpus"]
