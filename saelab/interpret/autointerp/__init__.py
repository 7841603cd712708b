"""Automatic interpretation: a language model explains each feature, another judges excerpts with it.

    prompts.py   contexts with <<marked>> tokens; explainer, detection and fuzzing prompts; parsing
    backends.py  who answers: `rule` (deterministic program), a local model, an OpenAI-compatible URL
    sampling.py  which excerpts: top + quantile examples to explain; held-out active and silent ones to test
    scoring.py   balanced accuracy, AUROC, shuffled-explanation baseline, bootstrap CIs over features
    cache.py     per-feature JSON records (atomic), resume, `load_results` for the dashboard
    run.py       the run: explain -> score -> shuffled baseline -> OUT/autointerp.json
    report.py    text summary, --dry-run prompt listing, the `saelab demo` step

Typical use (what `saelab autointerp` does):

    res = load_or_compute_stats(sae, store, hook)
    ai = run_autointerp(sae, store, hook, res.stats, [3, 17], AutointerpConfig(explainer="default"), "out/ai")
    print(format_summary(ai))
"""
from saelab.interpret.autointerp.backends import EndpointBackend, Judgement, LocalBackend, RuleBackend, make_backend
from saelab.interpret.autointerp.cache import load_results
from saelab.interpret.autointerp.config import AutointerpConfig
from saelab.interpret.autointerp.prompts import Context, Prompt, detect_prompt, explain_prompt, fuzz_prompt, render
from saelab.interpret.autointerp.report import demo_autointerp, format_prompts, format_summary
from saelab.interpret.autointerp.run import AutointerpResult, run_autointerp
from saelab.interpret.autointerp.scoring import auroc, binary_scores, derangement, summarize

__all__ = [
    "EndpointBackend", "Judgement", "LocalBackend", "RuleBackend", "make_backend", "load_results",
    "AutointerpConfig", "Context", "Prompt", "detect_prompt", "explain_prompt", "fuzz_prompt", "render",
    "demo_autointerp", "format_prompts", "format_summary", "AutointerpResult", "run_autointerp",
    "auroc", "binary_scores", "derangement", "summarize",
]
