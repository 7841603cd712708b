"""Builders for the circuit tests: a tiny random Llama, hand-made ReLU SAEs, a few prompts.

`linear_tail_llama` replaces the final RMSNorm by the identity, so the logits are a linear function
of the last layer's output and of the MLP-down input of that layer: attribution patching must then
equal the exact effect of patching a node at those hooks.
"""
from __future__ import annotations

import torch
from torch import nn

from saelab.circuits.prompts import Prompt
from saelab.circuits.sites import Site
from saelab.models import capture
from saelab.saes import ReLUConfig, make_sae
from tests.builders import tiny_llama

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "house"]


def model_and_tokenizer(num_layers: int = 3, linear_tail: bool = False, double: bool = True):
    model, tok = tiny_llama(seed=0, num_layers=num_layers)
    if linear_tail:
        model.model.norm = nn.Identity()
    if double:
        model = model.double()
    return model, tok


def relu_sae(d_in: int = 64, d_sae: int = 48, seed: int = 0, double: bool = True, x_ND=None):
    """A random ReLU SAE. Given activations x_ND, the encoder bias makes each latent fire on about a
    third of them and the decoder scale matches theirs (so latents and the error both matter)."""
    torch.manual_seed(seed)
    sae = make_sae(ReLUConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc_DF.normal_(0, 1 / d_in ** 0.5)
        sae.W_dec_FD.normal_(0, 1 / d_in ** 0.5)
        sae.b_enc_F.fill_(-0.3)
        if x_ND is not None:
            x = x_ND.float()
            pre = x @ sae.W_enc_DF
            sae.b_enc_F.copy_(-pre.quantile(0.66, dim=0))
            sae.W_dec_FD.mul_(x.norm(dim=-1).mean() / 4)
            sae.b_dec_D.copy_(x.mean(0) / 2)
    sae = sae.double() if double else sae
    return sae.eval()


def sites(model, batch, hooks: list[str], double: bool = True) -> list[Site]:
    """One calibrated random ReLU SAE per hook (d_sae = 3/4 of the hook's width)."""
    acts = capture(model, hooks, batch.input_ids_BS, batch.attention_mask_BS)
    out = []
    for i, h in enumerate(hooks):
        x_ND = acts[h][batch.attention_mask_BS.bool()][1:]
        d = x_ND.shape[-1]
        out.append(Site(name=h, hook=h, sae=relu_sae(d, 3 * d // 4, seed=i, double=double, x_ND=x_ND)))
    return out


def prompts(n: int = 4, length: int = 6, seed: int = 0, corrupted: bool = False) -> list[Prompt]:
    """Random word prompts; `corrupted` is the same words reversed (so the same token count)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)]
        answer = " " + WORDS[int(torch.randint(0, len(WORDS), (1,), generator=g))]
        out.append(Prompt(" ".join(words), answer, wrong_answer=" mat" if answer == " dog" else " dog",
                          corrupted=" ".join(reversed(words)) if corrupted else None))
    return out
