"""The CUDA paths (marked `cuda`, skipped without a GPU; they have not run on saelab's CPU-only CI).

    pytest -m cuda tests/gpu          # on a machine with 1 GPU (DDP needs 2)

- one training step of every architecture on CUDA equals the CPU step (loss, every gradient, the
  weights after Adam, the dead counters and BatchTopK's threshold), TF32 off;
- collect on CUDA stores the CPU run's rows (fp16, to rounding);
- DDP with NCCL on 2 GPUs gives the weights of one process on the global batch.
"""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from saelab.collect import CollectConfig, collect
from saelab.saes import REGISTRY, make_sae
from saelab.store import load_store
from saelab.train import step_
from saelab.train.checkpoint import RunState
from saelab.train.schedule import DeadTracker
from tests.builders import TINY_MODELS, make_text_corpus

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ARCH_KW = {"topk": dict(k=8, aux_k=16, dead_tokens=64), "batchtopk": dict(k=8, aux_k=16, dead_tokens=64),
           "relu": dict(l1_coeff=1.0), "jumprelu": dict(l0_coeff=1.0)}


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _step(sae, x_BD):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    out = sae.training_loss(x_BD)
    out.loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.before_optimizer_step_()
    opt.step()
    sae.after_optimizer_step_()
    return out, grads


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_training_step_cpu_equals_cuda(arch):
    kw = ARCH_KW.get(arch, {})
    sae_cpu = make_sae(REGISTRY[arch][1](d_in=64, d_sae=512, **kw))
    x = torch.randn(1024, 64) * 2 + 0.5
    sae_cpu.init_from_data_(x)
    if hasattr(sae_cpu, "tokens_since_fired_F"):
        sae_cpu.tokens_since_fired_F[::4] = 1000  # AuxK on
    sae_gpu = copy.deepcopy(sae_cpu).cuda()
    out_c, g_c = _step(sae_cpu, x)
    out_g, g_g = _step(sae_gpu, x.cuda())
    for field in ("loss", "mse", "aux", "l0", "fvu"):
        torch.testing.assert_close(getattr(out_g, field).cpu(), getattr(out_c, field), rtol=1e-4, atol=1e-5)
    for n in g_c:
        torch.testing.assert_close(g_g[n], g_c[n], rtol=1e-3, atol=1e-5, msg=lambda m: f"grad {n}: {m}")
    state_g = {k: v.cpu() for k, v in sae_gpu.state_dict().items()}
    for k, v in sae_cpu.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(state_g[k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(state_g[k], v), k


def test_collect_on_cuda_stores_the_cpu_rows(tmp_path):
    model, tok = TINY_MODELS["llama"]()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    corpus = make_text_corpus(tmp_path / "c", n_docs=12, seed=0)
    stores = {}
    for device in ("cpu", "cuda"):
        cfg = CollectConfig(out=str(tmp_path / device), model=str(tmp_path / "m"), layer=[1], corpus=str(corpus),
                            tokens=2000, chunk_tokens=500, max_length=16, batch_size=4, device=device)
        collect(cfg, quiet=True)
        st = load_store(tmp_path / device)
        stores[device] = np.concatenate([st.read_activations(c, "model.layers.1") for c in st.chunks])
    assert stores["cpu"].shape == stores["cuda"].shape and len(stores["cpu"]) >= 2000
    np.testing.assert_allclose(stores["cuda"].astype(np.float32), stores["cpu"].astype(np.float32),
                               rtol=2e-3, atol=2e-3)


def _nccl_worker(rank: int, world: int, port: int, x_TND: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    run = _run(x_TND, f"cuda:{rank}")
    half = x_TND.shape[1] // world
    for t, x_ND in enumerate(x_TND):
        step_(run, x_ND[rank * half:(rank + 1) * half].cuda(rank), lr=3e-3, sparsity_scale=1.0, step=t, world=world)
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in run.sae.state_dict().items()}, out)
    dist.barrier()  # tear gloo down together: a rank that leaves early can abort the other at shutdown
    dist.destroy_process_group()


def _run(x_TND, device):
    torch.manual_seed(0)
    sae = make_sae(REGISTRY["topk"][1](d_in=16, d_sae=64, k=4))
    sae.init_from_data_(x_TND[0])
    sae.to(device)
    return RunState("r", sae, torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True), DeadTracker(64, 5),
                    Path("."), ".")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP with NCCL needs 2 GPUs")
def test_ddp_nccl_equals_one_process(tmp_path):
    x_TND = torch.randn(8, 128, 16, generator=torch.Generator().manual_seed(3))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_nccl_worker, args=(2, port, x_TND, str(tmp_path / "ddp.safetensors")), nprocs=2, join=True,
                       start_method="spawn")
    run = _run(x_TND, "cuda:0")
    for t, x_ND in enumerate(x_TND):
        step_(run, x_ND.cuda(), lr=3e-3, sparsity_scale=1.0, step=t)
    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    for k, v in run.sae.state_dict().items():
        torch.testing.assert_close(ddp[k], v.cpu(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
