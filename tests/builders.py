"""Shared test builders: tiny models and tokenizers, text corpora, stores, hand-set SAEs, planted data.

Everything is built in-process from config classes and a few lines of text: no downloads.

Models and text
    model, tok = tiny_llama()          # LlamaForCausalLM, 2 layers, plus tiny_tokenizer(); vocab 256, width 64
    model, tok = tiny_gemma2()         # Gemma2ForCausalLM, 2 layers
    model, tok = tiny_deepseek_v3()    # DeepseekV3ForCausalLM, 3 layers (1 dense, 2 MoE), MLA
    save_tiny_llama(dir); make_adapter(base, out)      # a local model directory; a peft adapter on it
    make_text_corpus(tmp_path / "c", n_docs=5, seed=0) # doc_000.txt ... doc_004.txt
    hostile_tokenizer(dir)             # word-level tokenizer over HOSTILE_VOCAB (tokens that try to run code)
Stores (all through the real ShardWriter)
    write_store(root, seqs, acts)      # one row per token of each sequence; shards by sequence
    store_from_rows(root, x_ND)        # rows as 16-token sequences in one shard
    id_store(root)                     # rows whose column 0 is their global row id (store-order tests)
    saelab.store.synthetic.make_synthetic_store   # planted sparse features, for training
SAEs
    hand_sae(W_enc_DF, W_dec_FD, ...)  # any architecture with hand-set weights and metadata
    identity_sae(d)                    # exact reconstruction: x = relu(x) - relu(-x)
    const_sae(d, b_dec_D)              # reconstructs every token as b_dec_D
    relu_identity_sae(dir, d)          # saved, f = relu(x)
Autointerp and the browser
    planted_words(tmp_path)            # store + relu-identity SAE where feature j fires on exactly one word
    chromium(tmp_path, url, "--dump-dom")   # Debian's headless chromium (CHROMIUM), stdout
    dom = PageDom(); dom.feed(html)    # what the dashboard / circuit page rendered: root, imgs, examples, labels
Planted dictionaries and a short training loop
    data = PlantedDictionary(n_features=512, d=64, active=5, seed=0); x_BD = data.sample(1024)
    train_sae(sae, data, steps=2000); recovered_fraction(sae.W_dec_FD, data.dirs_FD)
"""
from __future__ import annotations

import functools
import random
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from saelab.collect import CollectConfig
from saelab.models.lora import LORA_TYPES
from saelab.saes import REGISTRY
from saelab.store import ShardWriter
from saelab.toy import PlantedFeatures

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


def save_tiny_llama(path: Path, **overrides) -> Path:
    """tiny_llama() and its tokenizer saved as a local model directory (config overrides allowed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if overrides:
        _, tok = tiny_llama()
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    else:
        model, tok = tiny_llama()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_adapter(base: Path, out: Path, targets=tuple(LORA_TYPES), rank: int = 2, only=None, seed: int = 1,
                 **lora_kw) -> Path:
    """A peft adapter on `base` with random A and B; with only=(layer, type) every other A is zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=[LORA_TYPES[t].split(".")[-1] for t in targets], **lora_kw)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if only is not None and ".lora_A." in name:
                layer, t = only
                if f"layers.{layer}.{LORA_TYPES[t]}.lora_A" not in name:
                    p.zero_()
    pm.save_pretrained(out)
    return out


def tiny_collect_cfg(model_dir, corpus, out, **kw):
    """A CollectConfig for a tiny model directory: layer 1, 16-token windows, 60-row chunks."""
    base = dict(out=str(out), model=str(model_dir), layer=[1], corpus=str(corpus), tokens=10_000,
                chunk_tokens=60, max_length=16, batch_size=2)
    base.update(kw)
    return CollectConfig(**base)


# ------------------------------------------------------------------ stores and SAEs

HOOK = "model.layers.0"
MODEL_SHA = "0" * 64

# Token texts a model vocabulary really can contain; the ones that would run code set data-pwned.
HOSTILE = [
    "</script><script>document.documentElement.setAttribute('data-pwned','script')</script>",
    "<img src=x onerror=\"document.documentElement.setAttribute('data-pwned','img')\">",
    "<!--<script>",
    "&amp;",
    "\"double\" 'single'",
    "a\u2028b",
]
WORDS = ["<unk>", " the", " cat", " sat", " on", " mat", "\n", " dog"]
HOSTILE_VOCAB = WORDS + HOSTILE


def hostile_tokenizer(directory: Path):
    """A word-level PreTrainedTokenizerFast over HOSTILE_VOCAB (id = position), saved to `directory`."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({t: i for i, t in enumerate(HOSTILE_VOCAB)}, unk_token="<unk>")),
        unk_token="<unk>")
    tok.save_pretrained(directory)
    return tok


def relu_identity_sae(directory: Path, d: int, model_sha: str = MODEL_SHA, hook: str = HOOK) -> Path:
    """A saved ReLU SAE with W_enc = W_dec = I_d (so f = relu(x)), recording its hook and model."""
    sae = hand_sae(torch.eye(d), torch.eye(d), hook=hook, model_sha=model_sha)
    sae.save(directory, metadata=sae.metadata)
    return Path(directory)


def write_store(root: Path, seqs: list[list[int]], acts: list[np.ndarray], tokenizer_dir: Path | None = None,
                num_shards: int = 1, seqs_per_chunk: int = 2, model_sha: str = MODEL_SHA,
                outlier_ratio: float | None = None) -> Path:
    """A store with the real ShardWriter: sequence i -> shard i % num_shards, row = one token.

    acts[i] is [len(seqs[i]), D] float; seqpos = (i, position). With `outlier_ratio` the writer
    flags rows whose norm exceeds that many times the median (massive activations).
    """
    d = acts[0].shape[1]
    meta = {"model": {"spec": str(tokenizer_dir or "none"), "name": "tiny", "sha256": model_sha,
                      "architecture": "LlamaForCausalLM", "num_layers": 1, "d_model": d},
            "hooks": [{"name": HOOK, "width": d}],
            "tokenizer": {"name": "hostile", "vocab_size": len(HOSTILE_VOCAB), "bos_id": 0, "eos_id": 0, "pad_id": 0},
            "corpus": {"spec": "test", "fingerprint": "x"}, "max_length": 64, "keep_special": True,
            "batch_size": 1, "chunk_tokens": 1, "tokens_target": sum(map(len, seqs))}
    if outlier_ratio is not None:
        meta["outlier_ratio"] = outlier_ratio
    for s in range(num_shards):
        w = ShardWriter.open(root, meta, s, num_shards)
        mine = [i for i in range(len(seqs)) if i % num_shards == s]
        for c in range(0, len(mine), seqs_per_chunk):
            part = mine[c:c + seqs_per_chunk]
            tokens = np.concatenate([np.asarray(seqs[i], np.int32) for i in part])
            seqpos = np.concatenate([np.stack([np.full(len(seqs[i]), i), np.arange(len(seqs[i]))], 1)
                                     for i in part]).astype(np.int32)
            x = np.concatenate([acts[i] for i in part]).astype(np.float32)
            w.write_chunk(tokens, seqpos, {HOOK: x}, sequences_done=c + len(part), batches_done=c + len(part))
        w.finish()
    return Path(root)


def hand_sae(W_enc_DF, W_dec_FD, b_enc_F=None, b_dec_D=None, arch="relu", hook=HOOK, model_sha=MODEL_SHA, **kw):
    """An SAE from saelab.saes with hand-set weights and the metadata training writes."""
    cls, cfg_cls = REGISTRY[arch]
    d_in, d_sae = W_enc_DF.shape
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, normalize_input=False, **kw))
    with torch.no_grad():
        sae.W_enc_DF.copy_(W_enc_DF)
        sae.W_dec_FD.copy_(W_dec_FD)
        sae.b_enc_F.copy_(b_enc_F if b_enc_F is not None else torch.zeros(d_sae))
        sae.b_dec_D.copy_(b_dec_D if b_dec_D is not None else torch.zeros(d_in))
    sae.metadata = {"hook": hook, "model": {"name": "tiny", "sha256": model_sha}}
    return sae.eval()


def identity_sae(d, **kw):
    """x = relu(x) - relu(-x): exact reconstruction with d_sae = 2 d (any topk with k >= d too)."""
    eye = torch.eye(d)
    return hand_sae(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0), **kw)


def const_sae(d, b_dec_D, d_sae=4):
    """Reconstructs every token as b_dec_D (no latent ever fires)."""
    return hand_sae(torch.zeros(d, d_sae), torch.zeros(d_sae, d), b_enc_F=-torch.ones(d_sae), b_dec_D=b_dec_D)


def store_from_rows(root, x_ND, hook=HOOK, model_sha=MODEL_SHA, chunk=64):
    """A one-shard store of the rows x_ND (stored as fp16): 16-token sequences, `chunk` rows per chunk."""
    x_ND = np.asarray(x_ND, dtype=np.float16)
    n, d = x_ND.shape
    meta = {
        "model": {"spec": "tiny", "name": "tiny", "sha256": model_sha, "architecture": "LlamaForCausalLM",
                  "num_layers": 2, "d_model": d},
        "hooks": [{"name": hook, "width": d}],
        "tokenizer": {"name": "tiny", "vocab_size": 256, "bos_id": 1, "eos_id": 2, "pad_id": 0},
        "corpus": {"spec": "synthetic", "fingerprint": "0"}, "max_length": 16, "keep_special": False,
        "batch_size": 1, "chunk_tokens": chunk, "tokens_target": n,
    }
    w = ShardWriter.open(root, meta, shard=0, num_shards=1)
    for i in range(0, n, chunk):
        rows = np.arange(i, min(i + chunk, n))
        w.write_chunk(np.full(len(rows), 5, np.int32), np.stack([rows // 16, rows % 16], 1).astype(np.int32),
                      {hook: x_ND[rows]}, sequences_done=int(rows[-1]) // 16 + 1, batches_done=i // chunk + 1)
    w.finish()
    return root


ID_HOOK = "model.layers.1"


def id_store_meta(**over) -> dict:
    """store.json fields of the id-store (hook ID_HOOK, width 4), with overrides."""
    meta = dict(model={"spec": "tiny", "sha256": "m0", "architecture": "LlamaForCausalLM"},
                hooks=[{"name": ID_HOOK, "width": 4}], max_length=16,
                tokenizer={"name": "tiny", "vocab_size": 256, "bos_id": 1, "eos_id": 2, "pad_id": 0},
                corpus={"spec": "c", "fingerprint": "f0"}, keep_special=False, batch_size=2, chunk_tokens=8,
                tokens_target=1000)
    meta.update(over)
    return meta


def chunk_arrays(shard: int, index: int, n: int, width: int = 4, first_row: int = 0):
    """Rows whose column 0 holds a global row id (exact in fp16 below 2048), tokens = id % 256."""
    ids = np.arange(first_row, first_row + n)
    x_ND = np.random.default_rng([shard, index]).standard_normal((n, width)).astype(np.float32)
    x_ND[:, 0] = ids
    seqpos_N2 = np.stack([np.full(n, shard), ids % 8], 1)  # sequence `shard` belongs to shard `shard`
    return (ids % 256).astype(np.int32), seqpos_N2.astype(np.int32), {ID_HOOK: x_ND}


def id_store(root: Path, num_shards=2, chunks=(3, 3), rows=(5, 7, 6), finish=True) -> Path:
    """A store whose rows carry their global row id (store order) in column 0."""
    row = 0
    for shard in range(num_shards):
        with ShardWriter.open(root, id_store_meta(), shard, num_shards) as w:
            for i in range(chunks[shard]):
                n = rows[i % len(rows)]
                w.write_chunk(*chunk_arrays(shard, i, n, first_row=row), sequences_done=i + 1, batches_done=i + 1)
                row += n
            if finish:
                w.finish()
    return root


# ------------------------------------------------------------------ planted dictionaries


class PlantedDictionary(PlantedFeatures):
    """x = sum over `active` random latents i (drawn with replacement) of m_i d_i (saelab.toy.PlantedFeatures)."""

    def __init__(self, n_features: int = 512, d: int = 64, active: int = 5, seed: int = 0):
        super().__init__(n_features, d, active, seed)


def recovered_fraction(W_dec_FD: torch.Tensor, dirs_FD: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of true directions whose best-matching decoder row has cosine >= threshold."""
    cos = F.normalize(dirs_FD, dim=-1) @ F.normalize(W_dec_FD.detach(), dim=-1).T
    return (cos.max(dim=1).values >= threshold).float().mean().item()


def train_sae(sae, data: PlantedDictionary, steps: int, batch: int = 512, lr: float = 3e-3,
              warmup_sparsity: int = 0) -> None:
    """A minimal training loop that calls the SAE exactly as train.py does."""
    sae.init_from_data_(data.sample(4096))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup_sparsity) if warmup_sparsity else 1.0
        out = sae.training_loss(data.sample(batch), sparsity_scale=scale)
        out.loss.backward()
        sae.before_optimizer_step_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.after_optimizer_step_()


# ------------------------------------------------------------------ autointerp: one feature per word

# feature -> the one token it fires on (feature 0: a hostile token, so its explanation is hostile text)
PLANTED_WORDS = {0: HOSTILE[1], 1: " cat", 2: " sat", 3: " mat", 4: " dog"}


def planted_words(tmp: Path, n_seq: int = 40, seq_len: int = 24, seed: int = 0) -> SimpleNamespace:
    """Store, relu-identity SAE and tokenizer where feature j fires exactly on PLANTED_WORDS[j] (value
    1 + 0.5·u, u uniform) and nowhere else; feature 5 never fires. Fields: store, sae, tok, tok_dir, seqs."""
    rng = np.random.default_rng(seed)
    d = len(PLANTED_WORDS) + 1
    ids_of = {f: HOSTILE_VOCAB.index(w) for f, w in PLANTED_WORDS.items()}
    seqs, acts = [], []
    for _ in range(n_seq):
        ids = rng.integers(1, len(HOSTILE_VOCAB), size=seq_len)
        x = np.full((seq_len, d), -1.0, np.float32)
        for f, t in ids_of.items():
            x[:, f] = np.where(ids == t, 1.0 + 0.5 * rng.random(seq_len), -1.0)
        seqs.append(ids.tolist())
        acts.append(x)
    tok = hostile_tokenizer(tmp / "tok")
    store = write_store(tmp / "store", seqs, acts, tmp / "tok", num_shards=1, seqs_per_chunk=8)
    sae = relu_identity_sae(tmp / "sae", d)
    return SimpleNamespace(store=store, sae=sae, tok=tok, tok_dir=tmp / "tok", seqs=seqs, tmp=tmp)


# ------------------------------------------------------------------ the browser

CHROMIUM = "/usr/bin/chromium"


def chromium(tmp_path: Path, url: str, *extra: str) -> str:
    """Run Debian's headless chromium on `url` (no network use) and return its stdout (e.g. --dump-dom)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
           "--window-size=1280,900", *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class PageDom(HTMLParser):
    """What a saelab page (dashboard or circuit) rendered, read from chromium's --dump-dom: the
    <html> and <body> attributes, every <img>, each example div (value, tokens, their data-act
    values, the centre token's position, data-index if set, and the id of the nearest enclosing
    div that has one) and the text of each position label (an SVG <text class="poslabel">, up to
    its <title> tooltip)."""

    def __init__(self):
        super().__init__()
        self.root, self.body, self.imgs, self.examples, self.labels = {}, {}, [], [], []
        self._divs: list[str | None] = []
        self._text = self._kind = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "html":
            self.root = a
        elif tag == "body":
            self.body = a
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "div":
            if "ex" in cls:
                index = a.get("data-index")
                self.examples.append({"index": None if index is None else int(index), "value": None, "tokens": [],
                                      "acts": [], "center": None,
                                      "section": next((d for d in reversed(self._divs) if d), None)})
            self._divs.append(a.get("id"))
        elif tag == "span" and "tok" in cls:
            ex = self.examples[-1]
            if "center" in cls:
                ex["center"] = len(ex["tokens"])
            ex["acts"].append(float(a["data-act"]))
            self._text, self._kind = "", "tok"
        elif tag == "span" and "val" in cls:
            self._text, self._kind = "", "val"
        elif tag == "text" and "poslabel" in cls:
            self._text, self._kind = "", "label"
        elif tag == "title" and self._kind == "label":  # the label's text ends where its tooltip starts
            self.labels.append(self._text)
            self._text = self._kind = None

    def handle_endtag(self, tag):
        if tag == "div" and self._divs:
            self._divs.pop()
        if self._kind == "tok" and tag == "span":
            self.examples[-1]["tokens"].append(self._text)
        elif self._kind == "val" and tag == "span":
            self.examples[-1]["value"] = self._text
        elif self._kind == "label" and tag == "text":
            self.labels.append(self._text)
        else:
            return
        self._text = self._kind = None

    def handle_data(self, data):
        if self._text is not None:
            self._text += data
