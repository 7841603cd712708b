"""Model passes of `saelab experiment reasoning`: hidden states of text units, per-unit feature sums, answer log-probs.

A *unit* is a span of tokens with one meaning: a model reply (`reply`), a window of a prose
document (`prose`), a problem statement (`statement`) or one human solution step (`step`). Every
item of text starts with BOS and is read alone (no packing across documents), so each unit belongs
to exactly one problem or document (the bootstrap's cluster). Statement and steps of one problem
are read as one item, so a step is seen in its context. Per unit u and feature f (t over its tokens):

    sum_UF[u, f] = sum_t f_t,     fired_UF[u, f] = #{t : f_t > 0},     n_U[u] = #t

Answer level (one teacher-forced pass per problem and batch of edit sets: the layers below the hook
run once, the batch widens to one row per ablation set at the hook): chat turn "user: statement", then "assistant: steps, 'The final answer is ' answer":

    logp_answer = sum over answer tokens of log p(token | everything before)
    logp_key    = mean over key tokens of the steps (tokens holding a digit) of log p(token | before)
    exact       = 1 if every answer token is the argmax (greedy would write this answer)

An ablation of set K at the SAE's hook (error term kept, BOS left alone):
    x' = x - (decode(f(x) * 1_K) - decode(0))      (= x - sum_{f in K} f_f W_dec[f] for a linear decoder)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from saelab.models import capture, splice
from saelab.store.format import write_bytes_atomic


class Item(NamedTuple):
    """One model input: token ids (BOS first) and the unit of each token (-1 = not in a unit)."""

    ids: np.ndarray
    unit: np.ndarray


def build_items(tokenizer, pieces: list[list[tuple[str, int]]], max_length: int, bos_id) -> list[Item]:
    """Each entry of `pieces` is a list of (text, unit) read in order as one item, cut at max_length."""
    out = []
    for segs in pieces:
        ids, unit = ([bos_id], [-1]) if bos_id is not None else ([], [])
        for text, u in segs:
            t = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += t
            unit += [u] * len(t)
        out.append(Item(np.array(ids[:max_length], np.int64), np.array(unit[:max_length], np.int64)))
    return out


def window_items(tokenizer, text: str, unit_start: int, max_length: int, bos_id) -> list[Item]:
    """A long document cut into windows of max_length - 1 tokens, each with BOS first; units unit_start, +1, ..."""
    t = tokenizer(text, add_special_tokens=False)["input_ids"]
    w = max_length - (1 if bos_id is not None else 0)
    out = []
    for j, s in enumerate(range(0, max(len(t), 1), w)):
        ids = ([bos_id] if bos_id is not None else []) + t[s:s + w]
        unit = ([-1] if bos_id is not None else []) + [unit_start + j] * len(t[s:s + w])
        out.append(Item(np.array(ids, np.int64), np.array(unit, np.int64)))
    return out


def _batches(items: list[Item], batch_size: int):
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        S = max(len(it.ids) for it in chunk)
        ids = torch.zeros(len(chunk), S, dtype=torch.long)
        mask = torch.zeros(len(chunk), S, dtype=torch.long)
        for b, it in enumerate(chunk):
            ids[b, :len(it.ids)] = torch.from_numpy(it.ids)
            mask[b, :len(it.ids)] = 1
        yield chunk, ids, mask


def hidden_states(model, hooks: list[str], items: list[Item], batch_size: int, quiet: bool = True) -> dict:
    """{hook: [N_tokens_in_units, D] float16} and the unit of each row, over every item (one pass)."""
    acts: dict[str, list] = {h: [] for h in hooks}
    units = []
    bar = tqdm(total=sum(len(it.ids) for it in items), unit="tok", desc="hidden states", disable=quiet,
               dynamic_ncols=True)
    for chunk, ids, mask in _batches(items, batch_size):
        x = capture(model, hooks, ids, mask)
        for b, it in enumerate(chunk):
            keep = torch.from_numpy(it.unit >= 0)
            for h in hooks:
                acts[h].append(x[h][b, :len(it.ids)][keep].to(torch.float16).cpu())
            units.append(it.unit[it.unit >= 0])
        bar.update(int(mask.sum()))
    bar.close()
    return {h: torch.cat(v) for h, v in acts.items()}, np.concatenate(units) if units else np.zeros(0, np.int64)


class UnitSums(NamedTuple):
    """Per-unit feature totals of one SAE (module docstring)."""

    sum_UF: np.ndarray
    fired_UF: np.ndarray
    n_U: np.ndarray


def unit_sums(sae, x_ND: torch.Tensor, unit_N: np.ndarray, n_units: int, chunk: int = 4096) -> UnitSums:
    """Encode every row with `sae` and add it to its unit's totals."""
    F = int(sae.W_dec_FD.shape[0])
    s = torch.zeros(n_units, F, dtype=torch.float64)
    k = torch.zeros(n_units, F, dtype=torch.float64)
    u_all = torch.from_numpy(unit_N)
    with torch.inference_mode():
        for a in range(0, x_ND.shape[0], chunk):
            f_NF = sae.encode(x_ND[a:a + chunk].float()).double()
            u = u_all[a:a + chunk]
            s.index_add_(0, u, f_NF)
            k.index_add_(0, u, (f_NF > 0).double())
    n = np.bincount(unit_N, minlength=n_units).astype(np.float64)
    return UnitSums(s.numpy().astype(np.float32), k.numpy().astype(np.float32), n)


class AnswerItem(NamedTuple):
    ids: np.ndarray
    answer_pos: np.ndarray
    """Positions of the answer tokens (targets)."""
    key_pos: np.ndarray
    """Positions of the steps' key tokens (targets holding a digit)."""


def answer_items(tokenizer, problems, max_length: int) -> list[AnswerItem]:
    """Teacher-forced chat transcripts: statement as the user turn, steps and the answer as the reply."""
    out = []
    for p in problems:
        msgs = [{"role": "user", "content": p.statement}]
        if getattr(tokenizer, "chat_template", None):
            head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            head = (tokenizer.bos_token or "") + p.statement + "\n"
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        key = []
        for step in p.steps:
            t = tokenizer(step + "\n", add_special_tokens=False)["input_ids"]
            key += [len(ids) + i for i, tid in enumerate(t) if any(c.isdigit() for c in tokenizer.decode([tid]))]
            ids += t
        ids += tokenizer("The final answer is ", add_special_tokens=False)["input_ids"]
        a = tokenizer(p.answer.strip(), add_special_tokens=False)["input_ids"]
        if not a or len(ids) + len(a) > max_length:
            continue
        ans = list(range(len(ids), len(ids) + len(a)))
        ids += a
        out.append((p, AnswerItem(np.array(ids, np.int64), np.array(ans), np.array(key, np.int64))))
    return out


def answer_scores(model, sae, hook: str, item: AnswerItem, sets: list[list[int]], batch_size: int) -> np.ndarray:
    """[len(sets), 3] (logp_answer, logp_key, exact) of one problem; an empty set = the clean model.

    Every row of a batch reads the same tokens and differs only from the hook on, so the layers below
    the hook run once on one row: at the hook the batch is widened to one row per set,

        x_BSD[b] = x_SD - (decode(f(x_SD) * 1_{K_b}) - decode(0))      (BOS row left alone)

    and logits are computed only at the positions that predict an answer or key token
    (`logits_to_keep`). Same numbers as one full forward per set (tested), at a fraction of the cost.
    """
    F = int(sae.W_dec_FD.shape[0])
    out = []
    ids_1S = torch.from_numpy(item.ids)[None]
    ap, kp = item.answer_pos - 1, item.key_pos - 1  # the positions whose logits predict those tokens
    pos_T = np.unique(np.concatenate([ap, kp]).astype(np.int64))
    tgt_T = torch.from_numpy(item.ids[pos_T + 1])
    a_i, k_i = torch.from_numpy(np.searchsorted(pos_T, ap)), torch.from_numpy(np.searchsorted(pos_T, kp))
    for a in range(0, len(sets), batch_size):
        group = sets[a:a + batch_size]
        M_BF = torch.zeros(len(group), F)
        for b, s in enumerate(group):
            if len(s):
                M_BF[b, torch.as_tensor(s)] = 1.0

        def widen(x_1SD, M_BF=M_BF):
            _, S_, D = x_1SD.shape
            B = M_BF.shape[0]
            x_SD = x_1SD[0].float()
            f_SF = sae.encode(x_SD)
            kept_NF = (f_SF[None] * M_BF[:, None, :].to(f_SF.device)).reshape(B * S_, F)
            d_BSD = (sae.decode(kept_NF) - sae.decode(torch.zeros_like(kept_NF[:1]))).reshape(B, S_, D)
            d_BSD[:, 0] = 0.0  # BOS untouched
            return (x_SD[None] - d_BSD).to(x_1SD.dtype)

        with torch.inference_mode(), splice(model, hook, widen):
            logits_BTV = model(input_ids=ids_1S, use_cache=False, logits_to_keep=torch.from_numpy(pos_T)).logits.float()
        lp_BTV = torch.log_softmax(logits_BTV, -1)
        tok_lp_BT = lp_BTV.gather(2, tgt_T[None, :, None].expand(len(group), -1, 1))[..., 0]
        right_BT = lp_BTV.argmax(-1) == tgt_T[None]
        for b in range(len(group)):
            key = float(tok_lp_BT[b, k_i].mean()) if len(k_i) else float("nan")
            out.append((float(tok_lp_BT[b, a_i].sum()), key, float(bool(right_BT[b, a_i].all()))))
    return np.array(out)


def save_keyed(path: str | Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    """`tensors` and `key` (what they were computed from) as one safetensors file, written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(path), save({**tensors, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}))


def load_keyed(path: str | Path | None, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors `save_keyed` wrote to `path`, or None when there is no file or it was made for another key."""
    if path is None or not Path(path).is_file():
        return None
    t = load_file(str(path))
    return t if "key" in t and bytes(t["key"].tolist()).decode() == key else None


def answer_key(model_id: str, sae, hook: str, items, sets: list[list[int]]) -> str:
    """What the answer-level scores depend on: the model, the SAE's weights, the hook, the token ids
    and positions of every problem, and the ablation sets (a checkpoint is reused only on a match)."""
    h = hashlib.sha256(f"{model_id}|{hook}|{json.dumps([list(map(int, s)) for s in sets])}".encode())
    for t in sae.state_dict().values():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    for _, it in items:
        for a in (it.ids, it.answer_pos, it.key_pos):
            h.update(np.asarray(a, np.int64).tobytes() + b"|")
    return h.hexdigest()


def answer_level(model, sae, hook: str, items, sets: list[list[int]], batch_size: int, quiet: bool = True,
                 checkpoint: str | Path | None = None, key: str = "") -> np.ndarray:
    """[n_problems, len(sets), 3] scores (see `answer_scores`).

    With `checkpoint` (a .safetensors path), the scores of the problems done so far are saved there
    after each problem, with `key` (`answer_key`); a run that finds a checkpoint with the same key
    starts after its last problem, so an interrupted run continues instead of starting over."""
    t = load_keyed(checkpoint, key)
    done = list(t["scores"].numpy()[:len(items)]) if t is not None and t["scores"].shape[1:] == (len(sets), 3) else []
    for _, it in tqdm(items[len(done):], desc="answer level", disable=quiet, dynamic_ncols=True,
                      initial=len(done), total=len(items)):
        done.append(answer_scores(model, sae, hook, it, sets, batch_size))
        if checkpoint:
            save_keyed(checkpoint, {"scores": torch.from_numpy(np.stack(done))}, key)
    return np.stack(done)
