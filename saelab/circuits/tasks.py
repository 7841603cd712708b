"""Built-in prompt sets (`--task NAME`): subject-verb agreement, small arithmetic, champ reasoning steps.

    agreement   "The author near the guards" -> " is" vs " are": the verb agrees with the subject,
                not with the attractor noun of the other number in between (cf. the agreement
                templates of Marks et al. 2024). Metric: logit difference. Counterfactual: the
                subject's number flipped (same template, same length).
    arithmetic  a two-shot prefix, then "37 + 5 = " -> "42" (a: 10-89, b: 1-9, sum <= 99). Metric: log
                probability of the answer digits (SmolLM2-style tokenizers split digits).
                Counterfactual: other operands, same length.
    champ       a competition-math problem from the champ corpus (`saelab corpora fetch champ`), the
                solution steps so far, and the next step up to its first number after an `=` (else its
                first number): the answer is that number (a "key token" of the step). Metric: log
                probability. Prompt lengths differ, so `--aggregate positions` suits it.

Given a tokenizer, agreement keeps the noun pairs whose singular and plural are one token each, so
every prompt of a task has the same token length and positions line up across prompts.
Every builder is deterministic for its seed.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from saelab.circuits.prompts import Prompt
from saelab.errors import UsageError, did_you_mean
from saelab.paths import saelab_home

NOUNS = [("author", "authors"), ("pilot", "pilots"), ("surgeon", "surgeons"), ("farmer", "farmers"),
         ("manager", "managers"), ("customer", "customers"), ("officer", "officers"), ("teacher", "teachers"),
         ("senator", "senators"), ("doctor", "doctors"), ("dancer", "dancers"), ("student", "students"),
         ("lawyer", "lawyers"), ("painter", "painters"), ("guard", "guards"), ("child", "children"),
         ("king", "kings"), ("friend", "friends"), ("driver", "drivers"), ("writer", "writers")]
PREPS = ["near", "behind", "beside", "with"]
SHOTS = "3 + 4 = 7\n15 + 2 = 17\n"


def _one_token(tokenizer, word: str) -> bool:
    return tokenizer is None or len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1


def agreement(n: int = 64, seed: int = 0, tokenizer=None) -> list[Prompt]:
    """Subject-verb agreement across a prepositional phrase with an attractor of the other number."""
    pairs = [p for p in NOUNS if _one_token(tokenizer, p[0]) and _one_token(tokenizer, p[1])]
    if len(pairs) < 2:
        raise UsageError("the tokenizer splits (almost) every noun of the agreement task into several tokens; "
                         "pass your own --prompts file instead.")
    rng = random.Random(seed)
    out = []
    for k in range(n):
        subj, attr = rng.sample(pairs, 2)
        plural = k % 2 == 1
        prep = rng.choice(PREPS)
        s, a = (subj[1], attr[0]) if plural else (subj[0], attr[1])
        flipped = subj[0] if plural else subj[1]
        right, wrong = (" are", " is") if plural else (" is", " are")
        out.append(Prompt(f"The {s} {prep} the {a}", right, wrong, corrupted=f"The {flipped} {prep} the {a}"))
    return out


def arithmetic(n: int = 64, seed: int = 0) -> list[Prompt]:
    """'a + b = ' -> 'a+b' after a two-shot prefix."""
    rng = random.Random(seed)

    def draw():
        a = rng.randint(10, 89)
        return a, rng.randint(1, min(9, 99 - a))

    out = []
    for _ in range(n):
        (a, b), (c, d) = draw(), draw()
        out.append(Prompt(f"{SHOTS}{a} + {b} = ", str(a + b), corrupted=f"{SHOTS}{c} + {d} = "))
    return out


_NUMBER = re.compile(r"\d+")


def champ_steps(path: str | Path | None = None, n: int = 64, seed: int = 0, max_chars: int = 700) -> list[Prompt]:
    """Problem + solution so far + next step up to its key number; answer = that number.

    Args:
        path: champ.jsonl (default: the fetched built-in corpus under SAELAB_HOME).
        max_chars: skip prompts longer than this (keeps forward passes short on a CPU).
    """
    p = Path(path) if path else saelab_home() / "corpora" / "champ" / "champ.jsonl"
    if not p.is_file():
        raise UsageError(f"the champ corpus is not fetched ({p} is missing). Run `saelab corpora fetch champ` "
                         "first (it downloads the champ-dataset package from PyPI).")
    texts = [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines()]
    out = step_prompts(texts, n, seed, max_chars)
    if not out:
        raise UsageError(f"{p} gave no usable champ step prompts (each needs a number in a step and a prompt "
                         f"of at most {max_chars} characters).")
    return out


def step_prompts(texts: list[str], n: int = 64, seed: int = 0, max_chars: int = 700) -> list[Prompt]:
    """The champ task's prompts from solution texts (statement, then one step per line), `n` of them
    in a seeded order: for each step with a number of at most 4 digits (the first after '=', else
    the first), the text up to that number, which is the answer. May return fewer than `n`, or none."""
    cands = []
    for text in texts:
        lines = text.split("\n")
        for i in range(1, len(lines)):
            step = lines[i]
            eq = step.find("=")
            m = _NUMBER.search(step, eq + 1) if eq >= 0 else None
            m = m or _NUMBER.search(step)
            if not m or len(m.group()) > 4:
                continue
            prompt = "\n".join(lines[:i]) + "\n" + step[:m.start()]
            if len(prompt) <= max_chars and not prompt.endswith(tuple("0123456789")):
                cands.append(Prompt(prompt, m.group()))
    random.Random(seed).shuffle(cands)
    return cands[:n]


TASKS = {"agreement": "subject-verb agreement across an attractor (logit difference is/are)",
         "arithmetic": "two-digit + one-digit addition after a two-shot prefix (log probability)",
         "champ": "next key number of a champ solution step (log probability)"}


def build_task(name: str, n: int = 64, seed: int = 0, tokenizer=None, champ_path=None,
               max_chars: int = 700) -> list[Prompt]:
    """The prompts of built-in task `name` (champ: `champ_path` instead of the fetched corpus, prompts of at
    most `max_chars` characters).

    Raises:
        UsageError: an unknown task name (with the list of tasks).
    """
    if name == "agreement":
        return agreement(n, seed, tokenizer)
    if name == "arithmetic":
        return arithmetic(n, seed)
    if name == "champ":
        return champ_steps(champ_path, n, seed, max_chars)
    raise UsageError(f"unknown task {name!r}.{did_you_mean(name, TASKS)} Built-in tasks: "
                     + ", ".join(f"{k} ({v})" for k, v in TASKS.items()))
