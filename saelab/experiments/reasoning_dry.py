"""Inputs for `saelab experiment reasoning --dry-run`: a tiny random Llama, a tiny SAE, small corpora.

Everything is built in-process (no download): a BPE tokenizer trained on the generated text, a
2-layer LlamaForCausalLM of width 64 from its config class, a TopK SAE on `model.layers.0` whose
metadata names that model, a champ-like v0.json (ids, categories, steps, answers, model replies) and a prose folder.
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
    cats = ["Number-Theory", "Polynomial", "Combinatorics"]
    problems = {}
    for i in range(24):
        steps = [_reasoning_doc(rng) if (i + j) % 2 else "Count the ways in words and argue why each case is distinct."
                 for j in range(1 + i % 5)]
        replies = [_reasoning_doc(rng) for _ in range(4)]
        problems[f"P_{cats[i % 3]}_{i}"] = {
            "identifier": f"P_{cats[i % 3]}_{i}", "_text": f"Find {i} + {i * 3}.", "category": cats[i % 3],
            "_answer": str(4 * i), "solution": {"steps": [{"_text": t} for t in steps]},
            "conversations": {"c0": {"messages": [{"role": "User", "text": "Solve it."}] +
                                     [{"role": "Model.tiny", "text": t} for t in replies]}}}
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
    saes = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sae = make_sae(TopKConfig(d_in=64, d_sae=128, k=8))
        sae.save(root / f"sae{seed}", metadata={"hook": "model.layers.0", "model": info})
        saes.append(str(root / f"sae{seed}"))
    return dataclasses.replace(
        cfg, sae=",".join(saes), model=str(root / "model"), prose_corpus=str(root / "prose"),
        problems_json=str(root / "v0.json"), select_units=40, test_units=30, problems=12, max_length=48,
        problem_max_length=128, batch_size=4, top=5, n_controls=30, neighbours=8, answer_problems=4,
        answer_controls=3, n_boot=100, min_freq=0.0)
