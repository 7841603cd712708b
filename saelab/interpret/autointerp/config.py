"""`AutointerpConfig`: the settings of `saelab autointerp` (attribute docstrings are its --help text)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from saelab.errors import UsageError

# Fields that change what is computed; the others (how to reach a backend) may change on resume.
TRANSPORT_FIELDS = ("api_key_env", "concurrency", "timeout", "retries", "batch_size")


@dataclass
class AutointerpConfig:
    """Explainer, scorer and the contexts they see."""

    explainer: str = "default"
    """Model that writes explanations: `default` (embedded SmolLM2-135M-Instruct), a .gguf file, a local
    model directory, an OpenAI-compatible URL (http://host:port/v1), or `rule` (a deterministic baseline)."""
    scorer: str = "default"
    """Model that judges excerpts given an explanation (same choices as --explainer)."""
    explainer_model: str | None = None
    """Model name sent to an explainer endpoint (default: the first one its /v1/models lists)."""
    scorer_model: str | None = None
    """Model name sent to a scorer endpoint (default: the first one its /v1/models lists)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the endpoint's API key (the key itself is never saved)."""
    n_top: int = 10
    """Top-activating examples shown to the explainer."""
    bands: int = 4
    """Activation-quantile bands; one example of each is also shown to the explainer."""
    n_test: int = 10
    """Held-out activating excerpts per feature (and as many silent ones) for detection and fuzzing."""
    context: int = 8
    """Tokens of context either side of an excerpt's centre token."""
    mark_threshold: float = 0.3
    """Mark a token when its activation is at least this fraction of the excerpt's largest."""
    max_new_tokens: int = 48
    """Longest explanation reply, in tokens."""
    concurrency: int = 4
    """Requests in flight at once to an endpoint."""
    timeout: float = 60.0
    """Seconds to wait for one endpoint reply."""
    retries: int = 3
    """Retries of a failed endpoint request (1, 2, 4, ... s apart) before giving up."""
    batch_size: int = 8
    """Prompts per forward pass of a local scorer."""
    seed: int = 0
    """Seed of the silent-excerpt sample, the wrong marks and the shuffled baseline."""

    def __post_init__(self):
        problems = []
        for name in ("n_top", "n_test", "bands", "max_new_tokens", "concurrency", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 0:
            problems.append(f"context must be >= 0, got {self.context}")
        if not 0 <= self.mark_threshold <= 1:
            problems.append(f"mark_threshold must be in [0, 1], got {self.mark_threshold}")
        if self.timeout <= 0 or self.retries < 0:
            problems.append(f"timeout must be > 0 and retries >= 0, got {self.timeout} and {self.retries}")
        if problems:
            raise UsageError("invalid autointerp settings:\n" + "\n".join(f"  - {p}" for p in problems))

    def identity(self) -> dict:
        """The fields that decide the results (part of the cache key); `rule:SECONDS` counts as `rule`."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in TRANSPORT_FIELDS}
        for k in ("explainer", "scorer"):
            if d[k].startswith("rule:"):
                d[k] = "rule"
        return d
