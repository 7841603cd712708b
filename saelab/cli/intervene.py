"""`saelab intervene SAE_DIR [SAE_DIR ...] --ablate 12,845 --steer 77:4.0 --corpus C`: edit features, see the effect.

Flags come from `InterveneConfig` (saelab/intervene/config.py); the edit texts are parsed here. With --corpus: loss change with a bootstrap
CI over sequences, KL from the clean model and the tokens whose probability moved most. With
--prompt: clean and edited greedy generations side by side. Both may be given.
"""
from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence

from saelab.cli.common import config_command
from saelab.corpus import open_corpus, pack_corpus
from saelab.errors import UsageError, raise_all
from saelab.intervene import (Edit, InterveneConfig, check_edit, check_sae_model, generate_pair,
                              measure_effect)
from saelab.models import list_hook_points, load_model_from, resolve_hooks, tokenizer_info
from saelab.saes import load_sae


def register(sub) -> None:
    """Add `intervene` to the `saelab` parser."""
    config_command(
        sub, "intervene", InterveneConfig, run,
        help="ablate / clamp / scale / steer SAE features and measure what changes",
        description="Splice SAEs into the model with feature edits (the reconstruction error is kept by "
                    "default) and report the change in next-token loss, KL and token probabilities, "
                    "or generations with and without the edits.",
        positionals=lambda p: p.add_argument("sae", nargs="+", metavar="SAE_DIR",
                                             help="SAE directories (e.g. runs/NAME/sae_best)"),
    )


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


def _fmt_text(t: str) -> str:
    return repr(t)[1:-1][:24]


def effect_table(eff) -> str:
    """The effect as a few aligned lines."""
    d = eff.delta_loss
    lines = [
        f"tokens {eff.n_tokens:,} in {eff.n_sequences} sequences",
        f"loss clean {eff.loss_clean:.4f}  edited {eff.loss_edited:.4f}  "
        f"delta {d.estimate:+.4f}  95% CI [{d.low:+.4f}, {d.high:+.4f}] (bootstrap over sequences)",
        f"KL(clean || edited) {eff.kl:.5f} nats/token",
        f"left unedited: BOS positions, and {eff.left_outliers:,} massive-activation positions (--keep-outliers edits them)",
        "",
        f"{'probability rose':<34}{'probability fell':<34}",
        f"{'token':<16}{'delta':>9}{'clean':>9}  {'token':<16}{'delta':>9}{'clean':>9}",
    ]
    for up, down in zip(eff.increased, eff.decreased):
        lines.append(f"{_fmt_text(up.text):<16}{up.delta_prob:>+9.4f}{up.clean_prob:>9.4f}  "
                     f"{_fmt_text(down.text):<16}{down.delta_prob:>+9.4f}{down.clean_prob:>9.4f}")
    return "\n".join(lines)


def run(cfg: InterveneConfig, args: argparse.Namespace) -> int:
    if not cfg.text.corpus and not cfg.prompt:
        raise UsageError("nothing to measure: pass --corpus TEXT (loss change, KL, token table) and/or "
                         "--prompt \"...\" (generations side by side).")
    if not (cfg.ablate or cfg.steer or cfg.clamp or cfg.scale):
        raise UsageError("no edit given: pass at least one of --ablate F, --steer F:ALPHA, --clamp F:V, "
                         "--scale F:C.")
    saes = [load_sae(p, device=cfg.lm.device) for p in args.sae]
    edits = parse_edits(saes, cfg)
    problems = [p for path, e in zip(args.sae, edits) for p in check_edit(e, path)]
    raise_all(problems, "bad feature edits")
    lm = load_model_from(cfg.lm, quiet=args.quiet)
    problems = [p for path, sae in zip(args.sae, saes) for p in check_sae_model(sae, lm.info, path)]
    hook_widths = dict(list_hook_points(lm.model))
    for path, e in zip(args.sae, edits):
        hp = resolve_hooks(lm.model, [e.hook_name()])[0]
        d_in, width = int(e.sae.W_dec_FD.shape[1]), hook_widths.get(hp.name, getattr(hp, "width", None))
        if width is not None and width != d_in:
            problems.append(f"{path} has d_in {d_in}, but hook {hp.name!r} of model {lm.info['name']} has "
                            f"width {width}")
    raise_all(problems, "these SAEs do not match the model")
    for path, e in zip(args.sae, edits):
        print(f"{path} @ {e.hook_name()}: ablate {list(e.ablate)} clamp {dict(e.clamp)} "
              f"scale {dict(e.scale)} steer {dict(e.steer)}; keep_error={cfg.keep_error}")
    if cfg.text.corpus:
        seqs = pack_corpus(open_corpus(cfg.text), lm.tokenizer, tokenizer_info(lm.tokenizer), cfg.text)
        eff = measure_effect(lm.model, edits, seqs, keep_error=cfg.keep_error, max_tokens=cfg.tokens,
                             batch_size=cfg.batch_size, tokenizer=lm.tokenizer, top_tokens=cfg.top_tokens,
                             n_boot=cfg.n_boot, seed=cfg.seed, quiet=args.quiet, keep_outliers=cfg.keep_outliers)
        print()
        print(effect_table(eff))
    if cfg.prompt:
        g = generate_pair(lm.model, lm.tokenizer, cfg.prompt, edits, max_new_tokens=cfg.max_new_tokens,
                          keep_error=cfg.keep_error, chat=cfg.chat)
        print()
        print(f"prompt: {g.prompt}")
        print(side_by_side(g.clean, g.edited))
    return 0


def side_by_side(clean: str, edited: str, width: int = 48) -> str:
    """Two columns, clean | edited, wrapped at `width` characters."""
    left = textwrap.wrap(clean.replace("\n", " / "), width) or [""]
    right = textwrap.wrap(edited.replace("\n", " / "), width) or [""]
    n = max(len(left), len(right))
    left += [""] * (n - len(left))
    right += [""] * (n - len(right))
    rows = [f"{'clean':<{width}} | edited", f"{'-' * width}-+-{'-' * width}"]
    rows += [f"{a:<{width}} | {b}" for a, b in zip(left, right)]
    return "\n".join(rows)
