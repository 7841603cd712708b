"""Inputs for `saelab experiment reasoning --dry-run`: a tiny random Llama, a tiny SAE, small corpora.

Everything is built in-process (no download): a BPE tokenizer trained on the generated text, a
2-layer LlamaForCausalLM of width 64 from its config class, a TopK SAE on `model.layers.0` whose
metadata names that model, and three small corpora standing in for champ-cot, sotu and champ.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

_WORDS = "the of and to a in that is was for it with as on be by not are from or have which we this nation people".split()
_MATH = "so then therefore we get thus hence since compute solve note".split()


def _reasoning_doc(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(3, 7)):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        parts.append(f"{rng.choice(_MATH).capitalize()} ${a} + {b} = {a + b}$ and {a} * 2 = {2 * a}.")
    return " ".join(parts)


def _prose_doc(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 90))).capitalize() + "."


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=256, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def dry_run_setup(cfg, root: Path):
    """Write the tiny inputs under `root` and return cfg pointing at them, with tiny settings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from saelab.models import load_model
    from saelab.saes import TopKConfig, make_sae

    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    reasoning = [_reasoning_doc(rng) for _ in range(40)]
    prose = [_prose_doc(rng) for _ in range(40)]
    for name, docs in (("reasoning", reasoning), ("prose", prose)):
        d = root / name
        d.mkdir(exist_ok=True)
        for i, text in enumerate(docs):
            (d / f"doc_{i:03d}.txt").write_text(text + "\n")
    cats = ["Number-Theory", "Polynomial", "Sequence"]
    problems = [{"_text": f"Find {i} + {i * 3}.", "category": cats[i % 3],
                 "solution": {"steps": [{"_text": _reasoning_doc(rng)} for _ in range(1 + i % 5)]}} for i in range(12)]
    (root / "v0.json").write_text(json.dumps({"problems": problems}))
    tok = _tokenizer(reasoning + prose + ["0123456789 +-*/=$()"])
    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(mcfg).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    info = load_model(str(root / "model"), quiet=True).info
    sae = make_sae(TopKConfig(d_in=64, d_sae=128, k=8))
    sae.save(root / "sae", metadata={"hook": "model.layers.0", "model": info})
    return dataclasses.replace(
        cfg, sae=str(root / "sae"), model=str(root / "model"), reasoning_corpus=str(root / "reasoning"),
        prose_corpus=str(root / "prose"), problems_json=str(root / "v0.json"), tokens=600, eval_tokens=300,
        problems=12, max_length=48, batch_size=4, top=5, ablate_top=4, control_seeds=2, freq_bins=4,
        n_boot=100, min_freq=0.0)
