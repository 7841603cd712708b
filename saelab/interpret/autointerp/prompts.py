"""Prompts of automatic interpretation: contexts with marked tokens, the explainer's and the scorers' messages.

Owns:
  * `Context`: a window of token texts with the feature's activation on each and which tokens carry
    marks. Tokens are marked where the feature fires strongly in that window:

        marked_t = f_t > 0  and  f_t >= mark_threshold · max_w f_w

    (delphi's rule; consecutive marked tokens share one <<...>> span).
  * `render(ctx, marks)`: the text a model reads, e.g. `the<< cat>> sat`. Newlines show as ↵ and the
    mark delimiters inside a token are replaced by look-alikes, so a token cannot forge a mark.
  * `Prompt`: one request (chat messages for a language model) plus the structured contexts and
    explanation it was built from (the rule backend reads those instead of the text).
  * `explain_prompt`, `detect_prompt`, `fuzz_prompt`, `parse_explanation`, `parse_yes_no`.

Leaves out: choosing which contexts (sampling.py), asking a model (backends.py), metrics (scoring.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

L_MARK, R_MARK = "<<", ">>"
MAX_EXPLANATION_CHARS = 200


class Context(NamedTuple):
    """A window of one sequence, as the prompts show it."""

    tokens: list[str]
    """Token texts, in order."""
    acts: list[float]
    """The feature's activation on each token."""
    marked: list[bool]
    """Tokens shown between << and >>."""
    index: int
    """Global store row of the window's centre token."""


def mark_active(acts: list[float], threshold: float) -> list[bool]:
    """marked_t = f_t > 0 and f_t >= threshold · max(f) (nothing marked when the window is silent)."""
    top = max(acts, default=0.0)
    return [a > 0 and a >= threshold * top for a in acts] if top > 0 else [False] * len(acts)


def _clean(token: str) -> str:
    return (token.replace("\n", "↵").replace("\r", "").replace("\t", "⇥")
            .replace("<<", "‹‹").replace(">>", "››"))


def render(ctx: Context, marks: bool = True) -> str:
    """The window as one string; with `marks`, runs of marked tokens go between << and >>."""
    out, open_ = [], False
    for tok, m in zip(ctx.tokens, ctx.marked):
        m = m and marks
        if m and not open_:
            out.append(L_MARK)
        elif not m and open_:
            out.append(R_MARK)
        open_ = m
        out.append(_clean(tok))
    if open_:
        out.append(R_MARK)
    return "".join(out)


@dataclass
class Prompt:
    """One request to a backend."""

    kind: Literal["explain", "detect", "fuzz"]
    """What is asked: an explanation, or a yes/no judgement."""
    messages: list[dict]
    """Chat messages ({"role", "content"}) for a language model."""
    contexts: list[Context] = field(default_factory=list)
    """The contexts shown (one for detect / fuzz)."""
    explanation: str = ""
    """The explanation judged (detect / fuzz)."""


EXPLAIN_SYSTEM = (
    "You study one feature of a language model: a unit that fires on some words or on some kind of text. "
    "You will see text excerpts where the feature fires; the tokens where it fires most are marked "
    "<<like this>>. Find what the marked tokens have in common (the word itself, its meaning, its role "
    "in the sentence, or the topic of the text). Reply with one short line that starts with "
    "'Explanation:' and describes the pattern in at most 15 words. Do not mention the << >> marks."
)

DETECT_SYSTEM = (
    "You study one feature of a language model. You are given an explanation of what the feature fires "
    "on and one text excerpt. Decide whether the feature fires anywhere in this excerpt. "
    "Answer with one word: Yes or No."
)

FUZZ_SYSTEM = (
    "You study one feature of a language model. You are given an explanation of what the feature fires "
    "on and one text excerpt in which some tokens are marked <<like this>>. Decide whether the marked "
    "tokens are exactly the kind of tokens the explanation describes. Answer with one word: Yes or No."
)


def explain_prompt(contexts: list[Context]) -> Prompt:
    """Ask for an explanation from marked examples (strongest first, as given)."""
    lines = [f"{i + 1}. {render(c)}" for i, c in enumerate(contexts)]
    user = "Excerpts where the feature fires:\n\n" + "\n".join(lines) + "\n\nWhat does the feature fire on?"
    return Prompt("explain", [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}],
                  contexts=list(contexts))


def detect_prompt(explanation: str, ctx: Context) -> Prompt:
    """Does the feature fire in this (unmarked) excerpt, given the explanation?"""
    user = (f"Explanation: {explanation}\n\nExcerpt: {render(ctx, marks=False)}\n\n"
            "Does the feature fire in this excerpt? Answer Yes or No.")
    return Prompt("detect", [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": user}],
                  contexts=[ctx], explanation=explanation)


def fuzz_prompt(explanation: str, ctx: Context) -> Prompt:
    """Are the marked tokens of this excerpt the ones the explanation describes?"""
    user = (f"Explanation: {explanation}\n\nExcerpt: {render(ctx)}\n\n"
            "Are the marked tokens correctly marked? Answer Yes or No.")
    return Prompt("fuzz", [{"role": "system", "content": FUZZ_SYSTEM}, {"role": "user", "content": user}],
                  contexts=[ctx], explanation=explanation)


def parse_explanation(text: str) -> str:
    """The explanation in a model's reply: the text after the last 'Explanation:' (else the first
    non-empty line), without surrounding quotes and markup, at most 200 characters."""
    text = text.strip()
    m = list(re.finditer(r"explanation\s*[:\]]", text, flags=re.IGNORECASE))
    if m:
        text = text[m[-1].end():]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.replace(L_MARK, "").replace(R_MARK, "").strip(" *_`'\u201c\u201d")
    if line.startswith('"') and line.endswith('"') and line.count('"') == 2:
        line = line[1:-1]
    return line[:MAX_EXPLANATION_CHARS].strip()


def parse_yes_no(text: str) -> bool | None:
    """True for an answer starting with yes, False for no, None for anything else."""
    m = re.match(r"\W*(yes|no)\b", text.strip(), flags=re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"
