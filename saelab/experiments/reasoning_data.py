"""Data for `saelab experiment reasoning`: champ problems with ids, problem-level splits, the mixed SAE corpus.

The champ JSON (`dataset_files/v0.json` inside the champ-dataset wheel, or the file itself) holds
270 problems, each with an identifier, a category (Combinatorics, Inequality, Number-Theory,
Polynomial, Sequence), the statement, human solution steps, the final answer, and model
conversations. The built-in `champ-cot` corpus drops which problem a reply answers; here every
reply keeps its problem, so a split by problem holds for reasoning text too:

    select, test = split_problems(ids, test_fraction, seed)      (disjoint; seeded permutation)

Features are chosen on `select` replies; every test reads `test` problems only.

The mixed SAE corpus (`write_mixed_corpus`): model replies of the `select` problems and prose
documents, taken in a seeded order until each side holds its share of `chars` characters:

    chars_reasoning = share * chars,  chars_prose = (1 - share) * chars
"""
from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path
from typing import NamedTuple

from saelab.errors import UsageError

FETCH_HINT = ("pip download --no-deps champ-dataset==1.0.0 -d downloads  "
              "(then pass downloads/champ_dataset-1.0.0-py3-none-any.whl)")


class ChampProblem(NamedTuple):
    """One champ problem with everything the experiment reads."""

    identifier: str
    category: str
    statement: str
    steps: list
    """Human-written solution steps, in order (strings)."""
    answer: str
    """The final answer as text ('' when the JSON has none)."""
    replies: list
    """Unique model-written replies to this problem (strings)."""


def read_champ_json(path: str | Path) -> dict:
    """The champ JSON from the champ-dataset wheel (.whl / .zip) or from v0.json itself."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--problems-json {p} does not exist. Get it with: {FETCH_HINT}")
    if p.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(p) as z:
            name = next((n for n in z.namelist() if n.endswith("dataset_files/v0.json")), None)
            if name is None:
                raise UsageError(f"{p} holds no dataset_files/v0.json; is it the champ-dataset wheel? {FETCH_HINT}")
            return json.loads(z.read(name))
    return json.loads(p.read_text())


def load_champ(path: str | Path) -> list[ChampProblem]:
    """Every problem of the champ JSON, in file order."""
    data = read_champ_json(path)
    probs = data.get("problems")
    probs = list(probs.values()) if isinstance(probs, dict) else list(probs or [])
    if not probs:
        raise UsageError(f"{path} holds no problems; is it champ's v0.json?")
    out = []
    for i, r in enumerate(probs):
        convs = r.get("conversations") or {}
        seen, replies = set(), []
        for conv in (convs.values() if isinstance(convs, dict) else convs):
            for m in conv.get("messages", []):
                t = m.get("text")
                if str(m.get("role", "")).startswith("Model") and t and t.strip() and t not in seen:
                    seen.add(t)
                    replies.append(t)
        steps = [s["_text"] for s in (r.get("solution") or {}).get("steps", [])]
        out.append(ChampProblem(str(r.get("identifier", f"P_{i}")), str(r.get("category", "unknown")),
                                str(r["_text"]), steps, str(r.get("_answer", "") or ""), replies))
    return out


def split_problems(ids: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(select, test): a seeded random partition of `ids`; test holds round(test_fraction * n) ids."""
    if not 0.0 < test_fraction < 1.0:
        raise UsageError(f"--test-fraction must be in (0, 1), got {test_fraction}.")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_test = max(1, min(len(order) - 1, round(test_fraction * len(order))))
    return sorted(order[n_test:]), sorted(order[:n_test])


def split_documents(docs: list[str], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(select, test) document indices: the same partition rule as `split_problems`."""
    sel, test = split_problems([f"{i:08d}" for i in range(len(docs))], test_fraction, seed)
    return [int(i) for i in sel], [int(i) for i in test]


def write_mixed_corpus(reasoning: list[str], prose: list[str], out: str | Path, chars: int, share: float,
                       seed: int = 0) -> dict:
    """JSONL of reasoning and prose documents in a seeded order, `share` of `chars` from reasoning.

    Returns the counts actually written ({'reasoning_docs', 'reasoning_chars', 'prose_docs', ...}).
    """
    rng = random.Random(seed)
    picked, counts = [], {}
    for name, docs, budget in (("reasoning", reasoning, share * chars), ("prose", prose, (1 - share) * chars)):
        order = list(range(len(docs)))
        rng.shuffle(order)
        n = c = 0
        for i in order:
            if c >= budget:
                break
            picked.append(docs[i])
            n, c = n + 1, c + len(docs[i])
        counts[f"{name}_docs"], counts[f"{name}_chars"] = n, c
    rng.shuffle(picked)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in picked))
    return counts
