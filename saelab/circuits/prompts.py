"""Prompts and the metric a circuit explains.

A prompt set is JSONL, one object per line: `prompt`, `answer`, optionally `wrong_answer` and
`corrupted` (a counterfactual prompt of the same token length to patch from). Every prompt starts
with BOS (added here); prompts are left-aligned and right-padded, so position t means the same
thing in every prompt of a templated set and BOS is always position 0.

Metrics, per prompt b (the circuit explains their mean over prompts, m = mean_b m_b):

    logprob:     m_b = sum_j log softmax(logits[p_b + j])[a_j]      answer tokens a_0..a_{n-1}, the
                 input is prompt + a_0..a_{n-2}, p_b = last prompt position
    logit_diff:  m_b = logits[p_b][a_0] - logits[p_b][w_0]          first tokens of answer / wrong_answer

Leaves out: chat templates (a prompt is raw text after BOS), sampling.
Shapes: B prompts, S positions, P metric positions per prompt, V vocab.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.errors import UsageError

Metric = Literal["auto", "logprob", "logit_diff"]


@dataclass
class Prompt:
    """One prompt of a task."""

    prompt: str
    """Text after BOS; the metric is read at its last token."""
    answer: str
    """The correct continuation (include its leading space, e.g. ' 19')."""
    wrong_answer: str | None = None
    """A wrong continuation: the metric becomes the logit difference answer - wrong_answer."""
    corrupted: str | None = None
    """A counterfactual prompt (same token length) to patch from instead of mean or zero ablation."""

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read a JSONL prompt file, reporting every bad line at once.

    Raises:
        UsageError: missing file, bad JSON, missing or non-string fields, unknown keys.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"prompt file {p} does not exist. Pass a JSONL file with one "
                         '{"prompt": ..., "answer": ...} object per line, or a built-in task (--task).')
    known = {"prompt", "answer", "wrong_answer", "corrupted"}
    out, problems = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: expected an object, got {type(obj).__name__}")
            continue
        bad = [k for k in ("prompt", "answer") if not isinstance(obj.get(k), str) or not obj.get(k)]
        bad += [k for k in ("wrong_answer", "corrupted") if k in obj and not isinstance(obj[k], str)]
        extra = sorted(set(obj) - known)
        if bad:
            problems.append(f"line {n}: field(s) {', '.join(bad)} missing or not a non-empty string")
        if extra:
            problems.append(f"line {n}: unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(known))})")
        if not bad and not extra:
            out.append(Prompt(**obj))
    if problems:
        raise UsageError(f"{p} has problems:\n" + "\n".join(f"  - {q}" for q in problems[:20])
                         + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    if not out:
        raise UsageError(f"{p} holds no prompts.")
    return out


def write_prompts(path: str | Path, prompts: list[Prompt]) -> list[Prompt]:
    """`prompts` as JSONL at `path` (read back by `read_prompts`); returns them."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(q.to_json(), ensure_ascii=False) + "\n" for q in prompts), encoding="utf-8")
    return prompts


class Batch(NamedTuple):
    """Tokenised prompts, right-padded."""

    input_ids_BS: Tensor
    attention_mask_BS: Tensor
    corrupted_ids_BS: Tensor | None
    """Counterfactual inputs (same lengths), or None."""
    read_pos_BP: Tensor
    """Positions whose logits the metric reads (padded by repeating the last one)."""
    target_BP: Tensor
    """Answer token read at each position."""
    wrong_BP: Tensor | None
    """Wrong-answer token (logit_diff only)."""
    weight_BP: Tensor
    """1 for a real metric position, 0 for padding."""
    metric: str
    """`logprob` or `logit_diff`."""
    tokens: list[list[int]]
    """Each prompt's real input ids (no padding)."""

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def resolve_metric(prompts: list[Prompt], metric: Metric) -> str:
    with_wrong = sum(p.wrong_answer is not None for p in prompts)
    if metric == "auto":
        return "logit_diff" if with_wrong == len(prompts) else "logprob"
    if metric == "logit_diff" and with_wrong < len(prompts):
        raise UsageError(f"--metric logit_diff needs a wrong_answer in every prompt; {len(prompts) - with_wrong} "
                         "of them have none. Add them or use --metric logprob.")
    return metric


def tokenize(tokenizer, prompts: list[Prompt], metric: Metric, bos_id: int, pad_id: int,
             corrupted: bool = True) -> Batch:
    """Tokenise prompts (BOS first) for `metric` ('auto': logit_diff when every prompt has a wrong answer);
    `corrupted=False` ignores the counterfactual prompts.

    Raises:
        UsageError: empty answers, equal first tokens for answer and wrong_answer, a corrupted prompt
            whose token length differs from its prompt; every offending prompt is listed.
    """
    metric = resolve_metric(prompts, metric)
    if not corrupted:
        prompts = [Prompt(p.prompt, p.answer, p.wrong_answer) for p in prompts]
    if any(p.corrupted is not None for p in prompts) and not all(p.corrupted is not None for p in prompts):
        raise UsageError("some prompts have a `corrupted` counterfactual and some do not; give it for all or none.")
    rows, corr, reads, targets, wrongs, problems = [], [], [], [], [], []
    for n, p in enumerate(prompts, 1):
        ids = [bos_id] + _encode(tokenizer, p.prompt)
        ans = _encode(tokenizer, p.answer)
        if not ans:
            problems.append(f"prompt {n}: the answer {p.answer!r} has no tokens")
            continue
        if metric == "logprob":
            tail, read, tgt, wrong = ans[:-1], [len(ids) - 1 + j for j in range(len(ans))], ans, None
        else:
            w = _encode(tokenizer, p.wrong_answer or "")
            if not w or w[0] == ans[0]:
                problems.append(f"prompt {n}: answer {p.answer!r} and wrong_answer {p.wrong_answer!r} start with "
                                "the same token (or the wrong answer is empty); the logit difference would be 0")
                continue
            tail, read, tgt, wrong = [], [len(ids) - 1], ans[:1], w[:1]
        rows.append(ids + tail)
        reads.append(read)
        targets.append(tgt)
        wrongs.append(wrong)
        if p.corrupted is not None:
            c = [bos_id] + _encode(tokenizer, p.corrupted)
            if len(c) != len(ids):
                problems.append(f"prompt {n}: corrupted prompt has {len(c)} tokens, the prompt {len(ids)} "
                                "(with BOS); counterfactuals must align token by token")
            corr.append(c + tail)
    if problems:
        raise UsageError("bad prompts:\n" + "\n".join(f"  - {q}" for q in problems[:20]))
    S, P = max(map(len, rows)), max(map(len, reads))

    def pad(seqs, width, value):
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    ids_BS = pad(rows, S, pad_id)
    mask_BS = pad([[1] * len(r) for r in rows], S, 0)
    weight_BP = pad([[1] * len(r) for r in reads], P, 0).float()
    read_BP = torch.tensor([r + [r[-1]] * (P - len(r)) for r in reads], dtype=torch.long)
    tgt_BP = torch.tensor([t + [t[-1]] * (P - len(t)) for t in targets], dtype=torch.long)
    wrong_BP = torch.tensor(wrongs, dtype=torch.long) if metric == "logit_diff" else None
    return Batch(ids_BS, mask_BS, pad(corr, S, pad_id) if corr else None, read_BP, tgt_BP, wrong_BP,
                 weight_BP, metric, rows)


def metric_from_logits(logits_BPV: Tensor, batch: Batch) -> Tensor:
    """m_B from the logits at the metric positions (module docstring)."""
    if logits_BPV.dtype in (torch.float16, torch.bfloat16):
        logits_BPV = logits_BPV.float()
    if batch.metric == "logit_diff":
        t = logits_BPV[:, 0].gather(-1, batch.target_BP[:, :1].to(logits_BPV.device))
        w = logits_BPV[:, 0].gather(-1, batch.wrong_BP[:, :1].to(logits_BPV.device))
        return (t - w).squeeze(-1)
    lp = F.log_softmax(logits_BPV, dim=-1).gather(-1, batch.target_BP.to(logits_BPV.device)[..., None]).squeeze(-1)
    return (lp * batch.weight_BP.to(lp)).sum(-1)


def metric_forward(model, batch: Batch, input_ids_BS: Tensor | None = None) -> Tensor:
    """Run the model (active splices apply) and return m_B; logits only at the metric positions."""
    device = next(model.parameters()).device
    ids = batch.input_ids_BS if input_ids_BS is None else input_ids_BS
    out = model(input_ids=ids.to(device), attention_mask=batch.attention_mask_BS.to(device), use_cache=False,
                logits_to_keep=batch.read_pos_BP.to(device))
    return metric_from_logits(out.logits, batch)
