"""Interventions: edit SAE features inside a running model, and measure what the edit does.

Modules:
  edits.py       `Edit` and the `intervene(model, edits)` context manager (the edit maths)
  lora_patch.py  edits at `lora:` hooks, in two passes per forward
  effects.py     `measure_effect(s)` (loss change with bootstrap CIs, KL, moved tokens), `generate_pair`
  config.py      `InterveneConfig`, the options of `saelab intervene`
"""
from saelab.intervene.config import InterveneConfig
from saelab.intervene.edits import (Edit, apply_edit, check_edit, edit_delta, edit_delta_reference, intervene,
                                    steer_vector)
from saelab.intervene.effects import Effect, Generations, TokenChange, generate_pair, measure_effect, measure_effects
from saelab.provenance import check_sae_model

__all__ = ["Edit", "Effect", "Generations", "InterveneConfig", "TokenChange", "apply_edit", "check_edit",
           "check_sae_model", "edit_delta", "edit_delta_reference", "generate_pair", "intervene", "measure_effect",
           "measure_effects", "steer_vector"]
