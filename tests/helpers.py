"""Shared test builders: tiny random models, a locally trained tokenizer, small text corpora.

Everything here is built in-process from config classes and a few lines of text: no downloads.
The tiny models all have vocab 256, width 64 and run a forward pass in well under a second.

    model, tok = tiny_llama()          # LlamaForCausalLM, 2 layers, plus tiny_tokenizer()
    model, tok = tiny_gemma2()         # Gemma2ForCausalLM, 2 layers
    model, tok = tiny_deepseek_v3()    # DeepseekV3ForCausalLM, 3 layers (1 dense, 2 MoE), MLA
    make_text_corpus(tmp_path / "c", n_docs=5, seed=0)   # doc_000.txt ... doc_004.txt
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

import torch

VOCAB = 256
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

_WORDS = (
    "the of and to a in that is was he for it with as his on be at by had not are but from or have "
    "an they which one you were her all she there would their we him been has when who will more no "
    "if out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "model layer feature sparse autoencoder token sequence union state nation congress people"
).split()


def _training_text() -> list[str]:
    rng = random.Random(1234)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(12)) + "." for _ in range(300)]
    lines.append("ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()-")
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A real `PreTrainedTokenizerFast` (BPE, vocab <= 256) trained here on a few hundred lines.

    Special tokens: <pad>=0, <bos>=1, <eos>=2, <unk>=3. Adds no special tokens by itself.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
    )
    assert len(tok) <= VOCAB, f"tiny tokenizer grew to {len(tok)} tokens; the tiny models have {VOCAB}"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    return tok


def _build(config, cls, seed: int):
    torch.manual_seed(seed)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    model = cls(config)
    model.eval()
    return model


def tiny_llama(seed: int = 0, num_layers: int = 2):
    """(LlamaForCausalLM with random weights, tiny_tokenizer())."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    return _build(cfg, LlamaForCausalLM, seed), tiny_tokenizer()


def tiny_gemma2(seed: int = 0):
    """(Gemma2ForCausalLM with random weights, tiny_tokenizer())."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=128, sliding_window=32)
    return _build(cfg, Gemma2ForCausalLM, seed), tiny_tokenizer()


def tiny_deepseek_v3(seed: int = 0):
    """(DeepseekV3ForCausalLM with random weights, tiny_tokenizer()): MLA attention, layer 0 dense,
    layers 1-2 MoE (4 routed experts, top-2, 1 shared expert)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        max_position_embeddings=128,
    )
    return _build(cfg, DeepseekV3ForCausalLM, seed), tiny_tokenizer()


TINY_MODELS = {"llama": tiny_llama, "gemma2": tiny_gemma2, "deepseek_v3": tiny_deepseek_v3}


def random_ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """input_ids_BS of random non-special token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, seq), generator=g)


def make_text_corpus(directory, n_docs: int = 5, seed: int = 0, words: tuple[int, int] = (20, 80)) -> Path:
    """Write `n_docs` small documents `doc_000.txt` ... into `directory` (created); return it.

    Each document is a few sentences of common English words, `words` = (min, max) words long.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n_docs):
        n = rng.randint(*words)
        text = " ".join(rng.choice(_WORDS) for _ in range(n))
        (d / f"doc_{i:03d}.txt").write_text(text[0].upper() + text[1:] + ".\n")
    return d
