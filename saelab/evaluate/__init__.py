"""Evaluate trained SAEs: reconstruction, sparsity, dictionary geometry and downstream loss.

Modules:
  config.py          `EvalConfig`, the options of `saelab evaluate`
  reconstruction.py  one streaming pass over a store: `accumulate`, `summarise`, `EvalResult`
  downstream.py      SAEs spliced into the model: CE clean / SAE / zero / mean, KL
  run.py             `evaluate(cfg)`, `evaluate_saes(...)`: checks, both passes, outputs
  report.py          eval.json, eval.md and the PNGs

Every equation lives in saelab.metrics; nothing here draws (saelab.plots does).
"""
from saelab.evaluate.config import MIN_TOKENS, EvalConfig
from saelab.evaluate.downstream import downstream
from saelab.evaluate.reconstruction import EvalResult, accumulate, dictionary_geometry, store_batches, summarise
from saelab.evaluate.report import markdown_table, summary_text, write_outputs
from saelab.evaluate.run import check_compatible, evaluate, evaluate_saes

__all__ = ["MIN_TOKENS", "EvalConfig", "EvalResult", "accumulate", "check_compatible", "dictionary_geometry",
           "downstream", "evaluate", "evaluate_saes", "markdown_table", "store_batches", "summarise", "summary_text", "write_outputs"]
