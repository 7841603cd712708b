"""LoRA stores through train, evaluate and intervene: automatic BatchTopK defaults, --adapter, lora_patch.

A tiny random Llama with a peft adapter on all seven types (rank 2: 2 layers x 7 x 2 = 28 wide),
collected at lora:gate,up,down,q,k,v,o; SAEs with hand-set weights from tests/test_evaluate.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saelab.cli import build_parser, main
from saelab.collect import CollectConfig, collect
from saelab.train.config import LORA_SAE_DEFAULTS, lora_train_defaults
from saelab.models import load_model
from saelab.models.lora import lora_patch
from saelab.saes import load_sae
from saelab.store import load_store
from saelab.train import AUTO_DEFAULTS, TrainConfig, resolve_auto, train
from tests.builders import make_text_corpus, random_ids
from tests.builders import const_sae, identity_sae
from tests.builders import make_adapter, save_tiny_llama

ALL = "lora:gate,up,down,q,k,v,o"
WIDTH = 2 * 7 * 2


@pytest.fixture(scope="module")
def lora_env(tmp_path_factory):
    """(base model dir, adapter dir, corpus dir, LoRA store dir) shared by the module."""
    root = tmp_path_factory.mktemp("lora_env")
    base = save_tiny_llama(root / "base")
    adapter = make_adapter(base, root / "adapter", rank=2)
    corpus = make_text_corpus(root / "corpus", n_docs=40, seed=0)
    collect(CollectConfig(out=str(root / "store"), model=str(base), adapter=str(adapter), hook=[ALL],
                          corpus=str(corpus), tokens=1600, chunk_tokens=256, max_length=32, batch_size=16), quiet=True)
    return base, adapter, corpus, root / "store"


def _short(store: Path, out: Path) -> dict:
    """Settings that keep a run to a couple of steps; none of the four automatic fields."""
    return dict(data=str(store), out=str(out), tokens=2048, eval_every=0, checkpoint_every=0, eval_tokens=512,
                init_tokens=1024, warmup_steps=0, val_fraction=0.2)


# ---------------------------------------------------------------------------------------------- train


def test_resolve_auto_precedence():
    lora = {"architecture": "batchtopk", "expansion_factor": [16], "k": [50], "batch_size": 1024}
    assert lora == LORA_SAE_DEFAULTS
    cfg = resolve_auto(TrainConfig(), lora)
    assert (cfg.architecture, cfg.expansion_factor, cfg.k, cfg.batch_size) == ("batchtopk", [16], [50], 1024)
    cfg = resolve_auto(TrainConfig(), {})
    assert [getattr(cfg, k) for k in AUTO_DEFAULTS] == list(AUTO_DEFAULTS.values()) == ["topk", [8], [32], 4096]
    cfg = resolve_auto(TrainConfig(k=[8], batch_size=256), lora)
    assert (cfg.architecture, cfg.expansion_factor, cfg.k, cfg.batch_size) == ("batchtopk", [16], [8], 256)


def test_lora_store_trains_with_batchtopk_defaults(lora_env, tmp_path):
    _, _, _, store = lora_env
    assert lora_train_defaults(load_store(store).meta, ALL) == LORA_SAE_DEFAULTS
    res = train(TrainConfig(**_short(store, tmp_path / "run")), quiet=True)
    assert [r.name for r in res.runs] == ["batchtopk_k50_x16"]
    sae = load_sae(res.final_dir)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.d_in, sae.cfg.d_sae) == ("batchtopk", 50, WIDTH, 16 * WIDTH)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    # the LoRA default batch (1024) shrinks like any unset batch, so 2048 tokens still give 8 steps
    expect = resolve_auto(TrainConfig(), LORA_SAE_DEFAULTS, run_tokens=2048).batch_size
    assert (saved["architecture"], saved["k"], saved["expansion_factor"], saved["batch_size"]) == (
        "batchtopk", [50], [16], expect) and expect == 256
    assert res.steps == 8 and res.tokens == 2048


def test_user_values_win_over_lora_defaults_flags_and_yaml(lora_env, tmp_path):
    from saelab.cli.train import build_train_config

    _, _, _, store = lora_env
    short = ["--tokens", "1024", "--eval-every", "0", "--checkpoint-every", "0", "--eval-tokens", "512",
             "--init-tokens", "512", "--warmup-steps", "0", "--val-fraction", "0.2", "--quiet"]
    assert main(["train", "--data", str(store), "--out", str(tmp_path / "flags"), "--architecture", "topk",
                 "--k", "8", "--expansion-factor", "2", "--batch-size", "256", *short]) == 0
    sae = load_sae(tmp_path / "flags" / "final")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.d_sae) == ("topk", 8, 2 * WIDTH)
    assert json.loads((tmp_path / "flags" / "config.json").read_text())["batch_size"] == 256

    # YAML sets two fields; the other two still come from the LoRA defaults
    (tmp_path / "c.yaml").write_text("k: [12]\nbatch_size: 512\n")
    cfg = build_train_config(build_parser().parse_args(
        ["train", "--config", str(tmp_path / "c.yaml"), "--data", str(store), "--out", str(tmp_path / "yaml"), *short]))
    assert (cfg.architecture, cfg.expansion_factor, cfg.k, cfg.batch_size) == (None, None, [12], 512)
    res = train(cfg, quiet=True)
    assert [r.name for r in res.runs] == ["batchtopk_k12_x16"]
    assert json.loads((tmp_path / "yaml" / "config.json").read_text())["batch_size"] == 512


def test_help_explains_automatic_fields(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "batchtopk on a LoRA store" in text and "1024 on a LoRA store" in text and "50 on a LoRA store" in text


# ------------------------------------------------------------------------------------------- evaluate


def _save(sae, path: Path, store_meta: dict) -> Path:
    sae.save(path, metadata={"hook": ALL, "model": store_meta["model"]})
    return path


def test_evaluate_with_adapter_on_lora_hook(lora_env, tmp_path):
    base, adapter, corpus, store = lora_env
    meta = load_store(store).meta
    ident = _save(identity_sae(WIDTH), tmp_path / "ident", meta)
    zero = _save(const_sae(WIDTH, torch.zeros(WIDTH)), tmp_path / "zero", meta)
    assert main(["evaluate", str(ident), str(zero), "--data", str(store), "--split", "all", "--model", str(base),
                 "--adapter", str(adapter), "--corpus", str(corpus), "--eval-tokens", "120", "--tokens", "512", "--out",
                 str(tmp_path / "ev"), "--quiet"]) == 0
    rows = json.loads((tmp_path / "ev" / "eval.json").read_text())
    rows = rows.get("results", rows) if isinstance(rows, dict) else rows
    r_id, r_zero = (next(r for r in rows if r["name"] == n) for n in ("ident", "zero"))
    assert abs(r_id["ce_zero"] - r_id["ce_clean"]) > 1e-3  # zeroing the adapters' A x changes the model
    assert r_id["ce_recovered"] == pytest.approx(1.0, abs=1e-6) and r_id["kl"] == pytest.approx(0.0, abs=1e-9)
    assert r_zero["ce_sae"] == pytest.approx(r_zero["ce_zero"], abs=1e-6)
    assert r_zero["ce_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_lora_hook_without_adapter_is_a_usage_error(lora_env, tmp_path, capsys):
    base, _, corpus, store = lora_env
    ident = _save(identity_sae(WIDTH), tmp_path / "ident", load_store(store).meta)
    assert main(["evaluate", str(ident), "--data", str(store), "--split", "all", "--model", str(base),
                 "--corpus", str(corpus), "--eval-tokens", "50", "--quiet"]) == 2
    assert "--adapter" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ intervene


def test_intervene_on_lora_hook(lora_env):
    from saelab.intervene import Edit, generate_pair, intervene

    base, adapter, _, _ = lora_env
    lm = load_model(str(base), adapter=str(adapter), quiet=True)
    ids, sae = random_ids(2, 12), identity_sae(WIDTH, hook=ALL)
    with torch.inference_mode():
        clean = lm.model(input_ids=ids).logits
        with intervene(lm.model, [Edit(sae)]):  # no edit: the two passes give back the same vector
            same = lm.model(input_ids=ids).logits
        # ablating every latent of the identity SAE (error kept) zeroes the LoRA vector: x + (0 - x)
        with intervene(lm.model, [Edit(sae, ablate=list(range(2 * WIDTH)))]):
            ablated = lm.model(input_ids=ids).logits
        with lora_patch(lm.model, ALL, torch.zeros(2, 12, WIDTH)):
            zeroed = lm.model(input_ids=ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ablated, zeroed, rtol=1e-5, atol=1e-5)
    assert (ablated - clean).abs().max() > 1e-3
    g = generate_pair(lm.model, lm.tokenizer, "the cat", [Edit(sae)], max_new_tokens=5)
    assert g.edited == g.clean


def test_cli_intervene_with_adapter(lora_env, tmp_path, capsys):
    base, adapter, corpus, store = lora_env
    ident = _save(identity_sae(WIDTH), tmp_path / "ident", load_store(store).meta)
    assert main(["intervene", str(ident), "--model", str(base), "--adapter", str(adapter), "--corpus", str(corpus),
                 "--ablate", "0,1", "--tokens", "100", "--max-length", "32", "--n-boot", "50", "--quiet"]) == 0
    assert "KL(clean || edited)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ dashboard


def test_dashboard_of_a_lora_store_has_adapter_heatmaps(lora_env, tmp_path):
    import re

    from saelab.recipes.lora_demo import lora_dashboard

    _, _, _, store = lora_env
    res = train(TrainConfig(**_short(store, tmp_path / "run")), quiet=True)
    page = lora_dashboard(res.final_dir, store, tmp_path / "dash.html", top_k=3, max_features=5).read_text()
    blocks = re.findall(r'<script type="application/json" id="fd-(\d+)">(.*?)</script>', page, re.S)
    assert 1 <= len(blocks) <= 5
    panels = [json.loads(body).get("panels") for _, body in blocks]
    assert all(p and p[0]["kind"] == "heatmap" for p in panels)
    assert len(panels[0][0]["rows"]) == 2 and len(panels[0][0]["cols"]) == 7  # layers x adapter types
