"""Interventions: edit SAE features inside a running model, and measure what the edit does.

Owns `Edit` (which features of which SAE to change, and how), the `intervene` context manager that
splices edits into the model (one or more SAEs, several hook points at once, through
`models.splice`, the mechanism `evaluate` uses too), `measure_effect` (loss change with a bootstrap
CI over sequences, KL from the clean model, tokens whose probability moved most), `generate_pair`
(clean vs edited greedy generations) and `check_sae_model` (an SAE trained on another model or
hook is refused). Leaves out: choosing features (experiments do), sampling-based generation.

Shapes: B batch, S sequence, D d_in, F d_sae, V vocab, T token predictions. At a hook, with
s the SAE's input scale (1 for a saved SAE) and x_BSD the activation:

    f        = encode(x)
    f'       = edit(f):  f'[:, scale] = f * c_j;  f'[:, clamp] = v_j;  f'[:, ablate] = 0   (in that order)
    steer_D  = sum_j alpha_j W_dec_FD[j] / s                       (decoder directions, raw units)
    keep_error=True  (default):  x' = x + (decode(f') - decode(f)) + steer_D
                               = decode(f') + (x - decode(f)) + steer_D     the error term is kept
    keep_error=False:            x' = decode(f') + steer_D                   the SAE replaces x

decode(f') - decode(f) = (f' - f)[:, J] W_dec_FD[J] / s over the edited features J only (the fast
path; `edit_delta_reference` decodes both in full). With no feature edit the activation is returned
unchanged (bit for bit), and with steering only the encoder never runs. Positions where `mask_BS`
is False (e.g. BOS, padding) are left alone.

A `lora:` hook (docs/lora.md) concatenates adapter activations computed at different depths, so it
cannot be spliced in one pass. Its edits run in two passes per forward call of the causal LM: a
capture pass reads x_BSD (with any edits at ordinary hooks already in place), x'_BSD is computed as
above, and the real pass runs inside `lora_patch(model, hook, x'_BSD)`. That needs the whole
sequence in each call, so generation under such edits recomputes without a KV cache.

Effect of an edit on a batch of packed sequences, over valid target positions t (target not
padding, position kept):

    dloss_s = mean_t [ CE(edited_t) - CE(clean_t) ]       per sequence s; CI: bootstrap over s
    KL      = mean_t KL(softmax(clean_t) || softmax(edited_t))
    dprob_v = mean_t [ softmax(edited_t)_v - softmax(clean_t)_v ]     per token id v
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab.corpus import batch_sequences
from saelab.errors import UsageError, raise_all
from saelab.statistics import CI, bootstrap_mean_ci

log = logging.getLogger(__name__)


@dataclass
class Edit:
    """Feature edits of one SAE at one hook point."""

    sae: Any
    """The SAE (`saelab.saes.SAE`); its d_in must equal the hook's width."""
    hook: str | None = None
    """Hook point to splice into; None = the hook recorded in the SAE's metadata.json."""
    ablate: Sequence[int] = ()
    """Features set to 0."""
    clamp: Mapping[int, float] = field(default_factory=dict)
    """Feature -> value it is set to (on every edited position, whether it fired or not)."""
    scale: Mapping[int, float] = field(default_factory=dict)
    """Feature -> factor its activation is multiplied by."""
    steer: Mapping[int, float] = field(default_factory=dict)
    """Feature -> alpha: add alpha * (decoder direction of the feature) to the activation."""

    def feature_ids(self) -> list[int]:
        """Every feature this edit names."""
        return [*map(int, self.ablate), *map(int, self.clamp), *map(int, self.scale), *map(int, self.steer)]

    def hook_name(self) -> str:
        hook = self.hook or (getattr(self.sae, "metadata", None) or {}).get("hook")
        if not hook:
            raise UsageError("this SAE records no hook point in its metadata.json; pass Edit(sae, hook=NAME) "
                             "(CLI: --hook NAME).")
        return hook

    def is_empty(self) -> bool:
        return not (self.ablate or self.clamp or self.scale or self.steer)


def check_edit(edit: Edit, name: str = "SAE") -> list[str]:
    """Problems with an edit's feature ids (out of range, non-integer), one string each."""
    d_sae = int(edit.sae.W_dec_FD.shape[0])
    problems = []
    for kind, ids in (("ablate", edit.ablate), ("clamp", edit.clamp), ("scale", edit.scale), ("steer", edit.steer)):
        bad = [i for i in ids if not (0 <= int(i) < d_sae)]
        if bad:
            problems.append(f"{name}: --{kind} feature(s) {', '.join(map(str, bad))} out of range; the SAE has "
                            f"{d_sae} features (ids 0 .. {d_sae - 1})")
    return problems


# ------------------------------------------------------------------------------------ CLI settings


@dataclass
class InterveneConfig:
    """Settings of `saelab intervene` (the SAE directories are positional)."""

    model: str = "default"
    """The model the SAEs were trained on: `default`, a .gguf file, a model directory or a hub id."""
    corpus: str | None = None
    """Text to measure the effect on (a path or built-in name); needed unless --prompt is given."""
    ablate: list[str] = field(default_factory=list)
    """Features set to 0: `12,845`; `I/F` targets the I-th SAE only (0-based), plain F every SAE."""
    steer: list[str] = field(default_factory=list)
    """Add alpha * decoder direction: `77:4.0,5:-2` (feature:alpha; `I/F:alpha` for one SAE)."""
    clamp: list[str] = field(default_factory=list)
    """Set a feature to a value: `5:2.0` (feature:value)."""
    scale: list[str] = field(default_factory=list)
    """Multiply a feature: `9:0.5` (feature:factor)."""
    hook: str | None = None
    """Hook point for every SAE (default: the hook in each SAE's metadata.json)."""
    keep_error: bool = True
    """Add the SAE's reconstruction error back, so only the edited features change the model."""
    tokens: int = 20_000
    """Token predictions to measure the effect on."""
    max_length: int = 256
    """Tokens per packed sequence."""
    batch_size: int = 8
    """Sequences per forward pass."""
    top_tokens: int = 10
    """Tokens listed per direction in the probability-change table."""
    n_boot: int = 2000
    """Bootstrap resamples for the loss-change interval."""
    seed: int = 0
    """Seed of the bootstrap."""
    prompt: str | None = None
    """Print clean and edited greedy generations of this prompt."""
    max_new_tokens: int = 40
    """Tokens to generate for --prompt."""
    chat: bool = False
    """Wrap --prompt in the model's chat template."""
    device: str = "cpu"
    """cpu, cuda, cuda:N."""
    dtype: str = "float32"
    """Model dtype: float32, float16, bfloat16."""
    adapter: str | None = None
    """peft LoRA adapter directory to load on top of --model (needed for SAEs on a lora: hook)."""


def _feature_target(text: str, n_saes: int, flag: str) -> tuple[int | None, int]:
    sae_i, _, feat = text.strip().rpartition("/")
    try:
        f = int(feat)
        i = int(sae_i) if sae_i else None
    except ValueError:
        raise UsageError(f"--{flag} {text!r}: expected a feature id (e.g. 12) or SAE/feature (e.g. 1/12).") from None
    if i is not None and not 0 <= i < n_saes:
        raise UsageError(f"--{flag} {text!r}: SAE index {i} out of range; {n_saes} SAE(s) given (0 .. {n_saes - 1}).")
    return i, f


def parse_edits(saes: Sequence, cfg: InterveneConfig) -> list[Edit]:
    """One Edit per SAE from the --ablate/--steer/--clamp/--scale texts of `cfg`.

    Raises:
        UsageError: malformed text (`77:4.0` expected), SAE index out of range.
    """
    edits = [Edit(sae, hook=cfg.hook, ablate=[], clamp={}, scale={}, steer={}) for sae in saes]
    for item in cfg.ablate:
        i, f = _feature_target(item, len(saes), "ablate")
        for e in (edits if i is None else [edits[i]]):
            e.ablate.append(f)  # type: ignore[union-attr]
    for flag in ("steer", "clamp", "scale"):
        for item in getattr(cfg, flag):
            feat, sep, value = str(item).rpartition(":")
            try:
                v = float(value)
            except ValueError:
                v = None
            if not sep or v is None:
                raise UsageError(f"--{flag} {item!r}: expected feature:value, e.g. 77:4.0 (several: 77:4.0,5:-1).")
            i, f = _feature_target(feat, len(saes), flag)
            for e in (edits if i is None else [edits[i]]):
                getattr(e, flag)[f] = v
    return edits


# ------------------------------------------------------------------------------------ the edit maths


def _edited_features(edit: Edit, f_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, f'[:, J] - f[:, J]) for the features J touched by scale / clamp / ablate."""
    J = sorted({*map(int, edit.scale), *map(int, edit.clamp), *map(int, edit.ablate)})
    idx_J = torch.tensor(J, dtype=torch.long, device=f_BF.device)
    f_BJ = f_BF[:, idx_J]
    new_BJ = f_BJ.clone()
    pos = {j: n for n, j in enumerate(J)}
    for j, c in edit.scale.items():
        new_BJ[:, pos[int(j)]] *= float(c)
    for j, v in edit.clamp.items():
        new_BJ[:, pos[int(j)]] = float(v)
    for j in edit.ablate:
        new_BJ[:, pos[int(j)]] = 0.0
    return idx_J, new_BJ - f_BJ


def steer_vector(edit: Edit) -> torch.Tensor | None:
    """steer_D = sum_j alpha_j W_dec_FD[j] / s, or None without steering."""
    if not edit.steer:
        return None
    sae = edit.sae
    idx = torch.tensor([int(j) for j in edit.steer], dtype=torch.long, device=sae.W_dec_FD.device)
    alpha = torch.tensor([float(a) for a in edit.steer.values()], dtype=sae.W_dec_FD.dtype, device=idx.device)
    return (alpha @ sae.W_dec_FD[idx]) / sae.input_scale


def edit_delta(edit: Edit, x_BD: torch.Tensor, f_BF: torch.Tensor | None = None) -> torch.Tensor:
    """decode(f') - decode(f) over the edited features only (float32 [B, D]); fast path."""
    sae = edit.sae
    if f_BF is None:
        f_BF = sae.encode(x_BD)
    idx_J, dF_BJ = _edited_features(edit, f_BF)
    return (dF_BJ @ sae.W_dec_FD[idx_J]) / sae.input_scale


def edit_delta_reference(edit: Edit, x_BD: torch.Tensor) -> torch.Tensor:
    """decode(f') - decode(f) by decoding both in full; the reference for `edit_delta`."""
    sae = edit.sae
    f_BF = sae.encode(x_BD)
    g_BF = f_BF.clone()
    for j, c in edit.scale.items():
        g_BF[:, int(j)] *= float(c)
    for j, v in edit.clamp.items():
        g_BF[:, int(j)] = float(v)
    for j in edit.ablate:
        g_BF[:, int(j)] = 0.0
    return sae.decode(g_BF) - sae.decode(f_BF)


def apply_edit(edit: Edit, x_BD: torch.Tensor, keep_error: bool = True) -> torch.Tensor:
    """x' for rows of raw activations (module docstring); computed in float32, returned in x's dtype."""
    has_feature_edit = bool(edit.ablate or edit.clamp or edit.scale)
    steer_D = steer_vector(edit)
    if keep_error and not has_feature_edit and steer_D is None:
        return x_BD
    x32 = x_BD.float()
    if keep_error:
        out = x32
        if has_feature_edit:
            out = out + edit_delta(edit, x32)
    else:
        f_BF = edit.sae.encode(x32)
        if has_feature_edit:
            idx_J, dF_BJ = _edited_features(edit, f_BF)
            f_BF = f_BF.index_add(1, idx_J, dF_BJ)
        out = edit.sae.decode(f_BF)
    if steer_D is not None:
        out = out + steer_D
    return out.to(x_BD.dtype)


def _splice_fn(edit: Edit, keep_error: bool, mask_BS: torch.Tensor | None, width: int):
    def fn(x_BSD: torch.Tensor) -> torch.Tensor:
        if x_BSD.shape[-1] != width:
            raise UsageError(f"the SAE has d_in {width}, but hook {edit.hook_name()!r} has width "
                             f"{x_BSD.shape[-1]}; pass the hook (and model) the SAE was trained on.")
        if mask_BS is None or tuple(mask_BS.shape) != tuple(x_BSD.shape[:2]):
            shape = x_BSD.shape
            return apply_edit(edit, x_BSD.reshape(-1, shape[-1]), keep_error).reshape(shape)
        rows = mask_BS.to(x_BSD.device).bool()
        out = x_BSD.clone()
        out[rows] = apply_edit(edit, x_BSD[rows], keep_error)
        return out
    return fn


@contextlib.contextmanager
def intervene(model, edits: Edit | Sequence[Edit], keep_error: bool = True,
              mask_BS: torch.Tensor | None = None) -> Iterator[list]:
    """Within the block, every forward pass of `model` runs with the edits spliced in.

        with intervene(model, [Edit(sae, ablate=[12, 845], steer={77: 4.0})]):
            logits = model(ids).logits

    Several edits may name different hook points (all applied in one pass) or the same one (applied
    in the order given, each to the previous one's output).

    Args:
        model: the causal LM (`LoadedModel.model`).
        edits: one Edit or a list.
        keep_error: add the SAE's reconstruction error back (only the edits change the model).
        mask_BS: bool [B, S], positions to edit; used when a forward's [B, S] matches it (other
            shapes, e.g. generation steps, edit every position). None = every position.
    Yields:
        the resolved HookPoints, one per edit.
    Raises:
        UsageError: unknown hook, feature id out of range, SAE width != hook width (on first forward).
    """
    from saelab.models import resolve_hooks, splice

    edits = [edits] if isinstance(edits, Edit) else list(edits)
    problems = [p for i, e in enumerate(edits) for p in check_edit(e, f"SAE #{i}")]
    raise_all(problems, "bad feature edits")
    hps = [resolve_hooks(model, [e.hook_name()])[0] for e in edits]
    lora_fns: dict[str, tuple[Any, list]] = {}  # lora hook name -> (hook point, edit fns in order)
    with contextlib.ExitStack() as stack:
        for e, hp in zip(edits, hps):
            fn = _splice_fn(e, keep_error, mask_BS, int(e.sae.W_dec_FD.shape[1]))
            if hasattr(hp, "parts"):
                lora_fns.setdefault(hp.name, (hp, []))[1].append(fn)
            else:
                stack.enter_context(splice(model, hp, fn))
        if lora_fns:
            _TwoPassLora(model, list(lora_fns.values())).install(stack)
        yield hps


def _cache_len(past) -> int:
    if past is None:
        return 0
    return int(past.get_seq_length()) if hasattr(past, "get_seq_length") else len(past)


class _TwoPassLora:
    """Edits at `lora:` hooks: before each forward of the causal LM, capture the clean LoRA vectors with
    the same inputs, apply the edit functions, and patch the real forward with `lora_patch`."""

    def __init__(self, model, items: list[tuple[Any, list]]):
        self.model, self.items = model, items
        self.busy, self.stack = False, None

    def install(self, stack: contextlib.ExitStack) -> None:
        from saelab.models.hooks import _causal_lm

        lm = _causal_lm(self.model)
        handles = [lm.register_forward_pre_hook(self.pre, with_kwargs=True),
                   lm.register_forward_hook(self.post, with_kwargs=True, always_call=True)]
        stack.callback(lambda: [h.remove() for h in handles])
        stack.callback(self.post, None, (), {}, None)

    def pre(self, mod, args, kwargs):
        from saelab.models import capture
        from saelab.models.lora import lora_patch

        if self.busy:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        names = ", ".join(hp.name for hp, _ in self.items)
        if ids is None or _cache_len(kwargs.get("past_key_values")) > 0:
            raise UsageError(f"edits at {names} need the whole token sequence in every forward pass (two passes: "
                             "capture, then patch); call the model with input_ids and no KV cache "
                             "(generate(..., use_cache=False)).")
        self.busy = True
        try:
            x = capture(self.model, [hp for hp, _ in self.items], ids, kwargs.get("attention_mask"))
        finally:
            self.busy = False
        self.stack = contextlib.ExitStack()
        for hp, fns in self.items:
            v_BSD = x[hp.name]
            for fn in fns:  # several edits at one hook compose in the order given
                v_BSD = fn(v_BSD)
            self.stack.enter_context(lora_patch(self.model, hp, v_BSD))
        return None

    def post(self, mod, args, kwargs, out):
        if not self.busy and self.stack is not None:
            self.stack.close()
            self.stack = None
        return None


# ------------------------------------------------------------------------------------ model identity


def _describe(info: Mapping | None) -> str:
    info = info or {}
    sha = str(info.get("sha256") or "?")
    return f"{info.get('name') or info.get('spec') or '?'} (sha256 {sha[:12]})"


def check_sae_model(sae, model_info: Mapping, name: str = "SAE") -> list[str]:
    """Problems when the SAE's metadata says it was trained on another model than `model_info`.

    Compares sha256 when both sides have one, else the model name; an SAE without model metadata
    passes (with a warning).
    """
    meta = (getattr(sae, "metadata", None) or {}).get("model") or {}
    if not meta:
        log.warning("%s records no model in metadata.json; cannot check it matches %s", name, _describe(model_info))
        return []
    a, b = meta.get("sha256"), model_info.get("sha256")
    same = (a == b) if (a and b) else (meta.get("name") == model_info.get("name"))
    if same:
        return []
    return [f"{name} was trained on activations of model {_describe(meta)}, but the loaded model is "
            f"{_describe(model_info)}; pass --model with the model the SAE was trained on"]


# ------------------------------------------------------------------------------------ measuring


class TokenChange(NamedTuple):
    """How the probability of one vocabulary token moved, averaged over predictions."""

    token_id: int
    text: str
    """The token decoded on its own (repr-safe for tables)."""
    delta_prob: float
    """mean_t (p_edited - p_clean)."""
    clean_prob: float
    """mean_t p_clean."""
    edited_prob: float
    """mean_t p_edited."""


@dataclass
class Effect:
    """What an edit does to next-token predictions on a set of sequences."""

    n_sequences: int
    """Sequences with at least one valid prediction (the bootstrap's units)."""
    n_tokens: int
    """Valid token predictions."""
    loss_clean: float
    """Mean CE of the clean model over the valid predictions (nats)."""
    loss_edited: float
    """Mean CE with the edits spliced in."""
    delta_loss: CI
    """mean over sequences of the per-sequence mean CE change, with a bootstrap CI over sequences."""
    kl: float
    """mean_t KL(clean || edited), nats."""
    increased: list[TokenChange]
    """Tokens whose mean probability rose most."""
    decreased: list[TokenChange]
    """Tokens whose mean probability fell most."""
    per_sequence_delta: list[float] = field(repr=False, default_factory=list)
    """dloss_s for each sequence (for pooling across runs)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["delta_loss"] = self.delta_loss._asdict()
        d["increased"] = [t._asdict() for t in self.increased]
        d["decreased"] = [t._asdict() for t in self.decreased]
        return d


def _token_text(tokenizer, i: int) -> str:
    if tokenizer is None:
        return f"<{i}>"
    try:
        return tokenizer.decode([i])
    except Exception:  # a tokenizer that cannot decode a lone id: show the id
        return f"<{i}>"


def measure_effect(model, edits: Edit | Sequence[Edit], sequences: Iterable, keep_error: bool = True,
                   max_tokens: int | None = None, batch_size: int = 8, tokenizer=None, top_tokens: int = 10,
                   level: float = 0.95, n_boot: int = 2000, seed: int = 0, quiet: bool = True) -> Effect:
    """Compare the edited model with the clean one on packed sequences (module docstring).

    Args:
        model: the causal LM.
        edits: the feature edits (see `intervene`); applied at kept positions only.
        sequences: `corpus.PackedSequence`s (anything with input_ids, attention_mask, keep_mask).
        max_tokens: stop after the batch that reaches this many valid predictions (None: all).
        tokenizer: to show token texts (None: ids only).
        top_tokens: how many tokens to list per direction.
    Raises:
        UsageError: no valid prediction in the sequences.
    """
    return measure_effects(model, [edits], sequences, keep_error, max_tokens, batch_size, tokenizer,
                           top_tokens, level, n_boot, seed, quiet)[0]


class _Sums:
    def __init__(self):
        self.ce, self.kl, self.per_seq, self.dprob_V = 0.0, 0.0, [], None


def measure_effects(model, edit_sets: Sequence, sequences: Iterable, keep_error: bool = True,
                    max_tokens: int | None = None, batch_size: int = 8, tokenizer=None, top_tokens: int = 10,
                    level: float = 0.95, n_boot: int = 2000, seed: int = 0, quiet: bool = True) -> list[Effect]:
    """`measure_effect` for several edit sets on the same sequences, sharing one clean pass per batch."""
    device = next(model.parameters()).device
    n_tok, ce_clean = 0, 0.0
    p_clean_V = None
    sums = [_Sums() for _ in edit_sets]
    bar = tqdm(total=max_tokens, unit="tok", desc="effect", disable=quiet, dynamic_ncols=True)
    with torch.inference_mode():
        for ids_BS, mask_BS, keep_BS, _ in batch_sequences(sequences, batch_size):
            valid_BS = torch.zeros_like(keep_BS)
            valid_BS[:, :-1] = keep_BS[:, :-1] & mask_BS[:, 1:].bool()
            if not valid_BS.any():
                continue
            fwd = dict(input_ids=ids_BS.to(device), attention_mask=mask_BS.to(device), use_cache=False)
            clean_BSV = model(**fwd).logits.float()
            rows = [b for b in range(ids_BS.shape[0]) if valid_BS[b].any()]
            clean_rows = []
            for b in rows:
                v_S = valid_BS[b].to(device)
                tgt_T = ids_BS[b, 1:].to(device)[v_S[:-1]]
                lc_TV = F.log_softmax(clean_BSV[b][v_S], -1)
                cc_T = -lc_TV.gather(1, tgt_T[:, None])[:, 0]
                clean_rows.append((v_S, tgt_T, lc_TV, cc_T))
                ce_clean += float(cc_T.double().sum())
                c_V = lc_TV.exp().double().sum(0).cpu()
                p_clean_V = c_V if p_clean_V is None else p_clean_V + c_V
                n_tok += int(v_S.sum())
                bar.update(int(v_S.sum()))
            del clean_BSV
            for edits, acc in zip(edit_sets, sums):
                with intervene(model, edits, keep_error=keep_error, mask_BS=keep_BS):
                    edit_BSV = model(**fwd).logits.float()
                for b, (v_S, tgt_T, lc_TV, cc_T) in zip(rows, clean_rows):
                    le_TV = F.log_softmax(edit_BSV[b][v_S], -1)
                    ce_T = -le_TV.gather(1, tgt_T[:, None])[:, 0]
                    acc.ce += float(ce_T.double().sum())
                    pc_TV = lc_TV.exp()
                    acc.kl += float((pc_TV * (lc_TV - le_TV)).sum(-1).double().sum())
                    acc.per_seq.append(float((ce_T - cc_T).double().mean()))
                    d_V = (le_TV.exp() - pc_TV).double().sum(0).cpu()
                    acc.dprob_V = d_V if acc.dprob_V is None else acc.dprob_V + d_V
            if max_tokens is not None and n_tok >= max_tokens:
                break
    bar.close()
    if n_tok == 0:
        raise UsageError("the corpus gave no token to predict (every position is BOS, EOS or padding). "
                         "Pass a corpus with text in it.")
    p_clean_V = p_clean_V / n_tok
    out = []
    for acc in sums:
        dprob_V = acc.dprob_V / n_tok
        k = min(top_tokens, dprob_V.numel())

        def changes(order, d=dprob_V) -> list[TokenChange]:
            return [TokenChange(int(i), _token_text(tokenizer, int(i)), float(d[i]), float(p_clean_V[i]),
                                float(p_clean_V[i] + d[i])) for i in order]

        out.append(Effect(
            n_sequences=len(acc.per_seq), n_tokens=n_tok, loss_clean=ce_clean / n_tok, loss_edited=acc.ce / n_tok,
            delta_loss=bootstrap_mean_ci(acc.per_seq, level=level, n_boot=n_boot, seed=seed), kl=acc.kl / n_tok,
            increased=changes(torch.topk(dprob_V, k).indices.tolist()),
            decreased=changes(torch.topk(-dprob_V, k).indices.tolist()), per_sequence_delta=acc.per_seq,
        ))
    return out


# ------------------------------------------------------------------------------------ generation


class Generations(NamedTuple):
    """Greedy continuations of one prompt."""

    prompt: str
    clean: str
    edited: str


def generate_pair(model, tokenizer, prompt: str, edits: Edit | Sequence[Edit], max_new_tokens: int = 40,
                  keep_error: bool = True, chat: bool = False) -> Generations:
    """Greedy generations without and with the edits (the edits apply to the prompt and every new token).

    Args:
        chat: wrap the prompt in the tokenizer's chat template as one user turn.
    """
    device = next(model.parameters()).device
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat needs a tokenizer with a chat template; this model's has none. "
                             "Drop --chat to use the prompt as plain text.")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    ids = enc["input_ids"].to(device)
    mask = enc.get("attention_mask", torch.ones_like(ids)).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def gen(use_cache: bool = True) -> str:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, use_cache=use_cache)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    clean = gen()
    with intervene(model, edits, keep_error=keep_error) as hps:
        edited = gen(use_cache=not any(hasattr(hp, "parts") for hp in hps))  # lora: hooks need two passes
    return Generations(prompt, clean, edited)


__all__ = ["Edit", "InterveneConfig", "parse_edits", "check_edit", "steer_vector", "edit_delta", "edit_delta_reference", "apply_edit", "intervene",
           "check_sae_model", "TokenChange", "Effect", "measure_effect", "measure_effects", "Generations", "generate_pair"]
