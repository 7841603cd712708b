"""`CorpusConfig`: which text to read and how to pack it, shared by every stage that reads a corpus.

Embedded with `saelab.config.group(CorpusConfig, ...)`, its fields are the flags `--corpus`,
`--text-field`, `--text-template`, `--max-length`, `--keep-special`, `--shuffle-documents`, `--document-seed` of collect, train (streaming),
evaluate, intervene and lora-finetune, each stage with its own defaults.
"""
from __future__ import annotations

from dataclasses import dataclass

from saelab.errors import raise_all


@dataclass
class CorpusConfig:
    """A corpus and its packing into token windows."""

    corpus: str | None = None
    """Text file, folder of .txt, .jsonl, .parquet, a built-in name (sotu, shakespeare, champ, champ-cot) or hf:NAME."""
    text_field: str = "text"
    """JSONL / Parquet field that holds the text."""
    text_template: str | None = None
    """Join several JSONL fields, e.g. '{question}\\n{reasoning}\\n{answer}'."""
    max_length: int = 1024
    """Tokens per packed sequence (BOS/EOS between documents)."""
    keep_special: bool = False
    """Also use BOS and padding positions (left out by default: their activations are outliers)."""
    shuffle_documents: bool = True
    """Read the documents in a seeded random order, so a token budget samples the whole corpus (the
    built-in corpora are grouped: champ-cot holds ~90 replies per problem in a row)."""
    document_seed: int = 0
    """Seed of that order."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_length < 2:
            problems.append(f"--max-length must be at least 2, got {self.max_length}")
        raise_all(problems, "invalid corpus settings")
