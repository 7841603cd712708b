"""The activation store: sharded fp16 chunks of hook-point activations with a checksummed manifest.

    STORE/store.json                 run manifest (model, hooks, tokenizer, corpus, packing rule)
    STORE/shard_00000/manifest.json  one entry per complete chunk, sha256 per file
    STORE/shard_00000/chunk_000000.{tokens,seqpos,<hook>}.npy

Modules, one job each:
  format.py   names, identity fields, atomic file writes, JSON and hash helpers (no state)
  writer.py   `ShardWriter`: one process per shard, flock'd, resumable, atomic chunk commits
  chunk.py    `ChunkBuilder`: one chunk's files written batch by batch, fp16 with overflow/NaN counts, row norms
  reader.py   `load_store(path) -> ActivationStore`: checked memory-mapped reads, the train/val split
  batches.py  `BatchIterator`: shuffled, resumable float32 batches across chunks
  lock.py     one writer per shard (flock; the lock file names pid and host), `preflight` checks
  check.py    `verify_store`, `monitor_snapshot` and their renderings
  rebuild.py  `rebuild_manifests`: a lost shard manifest, rebuilt only after every chunk is checked
  remote.py   object storage: fsspec URLs -> `RemotePath`, atomic puts, exclusive creates, backend errors
  lease.py    one writer per shard on object storage (a lease object with a heartbeat, no flock)
  prefetch.py `Prefetcher`: remote chunks read ahead in a background thread, in the stream's order

Every function that takes a store path also takes an fsspec URL (s3://bucket/run, gs://...); a
plain path or file:// URL stays local and keeps memory-mapped reads, flock and fsync.

Importing this package does not import torch (only `ActivationStore.batches` does).
"""
from saelab.store.format import (
    FORMAT_VERSION, FP16_MAX, IDENTITY_FIELDS, MANIFEST_JSON, SEQPOS, STORE_JSON, TOKENS, ChunkEntry,
    chunk_file_name, hook_key, read_json, sha256_file, shard_dir_name,
)
from saelab.store.reader import ActivationStore, ChunkInfo, Split, check_file, load_store, unit_hash
from saelab.store.chunk import ChunkBuilder, to_fp16
from saelab.store.writer import ShardWriter

__all__ = [
    "FORMAT_VERSION", "FP16_MAX", "IDENTITY_FIELDS", "MANIFEST_JSON", "SEQPOS", "STORE_JSON", "TOKENS",
    "ActivationStore", "ChunkBuilder", "ChunkEntry", "ChunkInfo", "ShardWriter", "Split", "check_file",
    "chunk_file_name", "hook_key", "load_store", "read_json", "sha256_file", "shard_dir_name", "to_fp16",
    "unit_hash",
]
