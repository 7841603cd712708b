"""dictionary_learning -> saelab, against the real dictionary_learning classes and their ae.pt files.

dictionary_learning's package __init__ imports its activation buffer, which needs nnsight (not
installed: `make setup` installs dictionary-learning with --no-deps). The dictionaries themselves need
only torch and einops, so the tests import those modules from the installed package directly.
"""
import importlib.util
import inspect
import json
import sys
import types

import pytest
import torch

from saelab.errors import UsageError
from saelab.saes import load_sae
from saelab.saes.formats import detect_format, load_foreign

D, F, K = 16, 48, 5


@pytest.fixture(scope="module")
def dl():
    """(dictionary module, trainers package) of the installed dictionary_learning, its __init__ skipped."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None:
        pytest.skip("needs dictionary-learning (make setup installs it with --no-deps)")
    saved = sys.modules.get("dictionary_learning")
    if saved is None or not hasattr(saved, "AutoEncoder"):
        shell = types.ModuleType("dictionary_learning")
        shell.__path__ = list(spec.submodule_search_locations)
        sys.modules["dictionary_learning"] = shell
    dictionary = importlib.import_module("dictionary_learning.dictionary")
    top_k = importlib.import_module("dictionary_learning.trainers.top_k")
    batch_top_k = importlib.import_module("dictionary_learning.trainers.batch_top_k")
    matryoshka = importlib.import_module("dictionary_learning.trainers.matryoshka_batch_top_k")
    standard = importlib.import_module("dictionary_learning.trainers.standard")
    trainers = importlib.import_module("dictionary_learning.trainers")
    return types.SimpleNamespace(
        trainers={c.__name__: c for c in (trainers.StandardTrainer, standard.StandardTrainerAprilUpdate,
                                          trainers.TopKTrainer, trainers.BatchTopKTrainer, trainers.JumpReluTrainer,
                                          trainers.GatedSAETrainer, matryoshka.MatryoshkaBatchTopKTrainer)},
        AutoEncoder=dictionary.AutoEncoder, AutoEncoderNew=dictionary.AutoEncoderNew,
        GatedAutoEncoder=dictionary.GatedAutoEncoder, JumpReluAutoEncoder=dictionary.JumpReluAutoEncoder,
        AutoEncoderTopK=top_k.AutoEncoderTopK, BatchTopKSAE=batch_top_k.BatchTopKSAE,
        MatryoshkaBatchTopKSAE=matryoshka.MatryoshkaBatchTopKSAE)


def _build(dl, cls):
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        ae = getattr(dl, cls)(D, F, K)
    elif cls == "MatryoshkaBatchTopKSAE":
        ae = dl.MatryoshkaBatchTopKSAE(D, F, K, group_sizes=[8, 16, 24])
    else:
        ae = getattr(dl, cls)(D, F)
    with torch.no_grad():
        for n, p in ae.named_parameters():
            p.copy_(torch.rand_like(p) * 1.2 - 0.2 if n == "threshold" else torch.randn_like(p) * 0.3)
        if hasattr(ae, "threshold") and ae.threshold.ndim == 0:
            ae.threshold.fill_(0.6)  # the BatchTopK inference threshold
    return ae


def _save(ae, d, cls, submodule="resid_post_layer_3"):
    """As dictionary_learning/training.py does: config.json, then torch.save of the state_dict as ae.pt."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": cls, "activation_dim": D, "dict_size": F, "k": K, "layer": 3, "lm_name": "EleutherAI/pythia-70m",
        "submodule_name": submodule}}, indent=4))
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, d / "ae.pt")


ARCH = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
        "MatryoshkaBatchTopKSAE": "batchtopk", "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "jumprelu"}


@pytest.mark.parametrize("cls", sorted(ARCH))
def test_dictionary_learning_ae_imports_exactly(tmp_path, agree, dl, cls):
    ae = _build(dl, cls)
    _save(ae, tmp_path / "trainer_0", cls)
    assert detect_format(tmp_path) == "dictionary-learning"
    ours = load_foreign(tmp_path)  # the run's only trainer
    assert ours.cfg.architecture == ARCH[cls]
    assert ours.metadata["hook"] == "model.layers.3" and ours.metadata["imported"]["model"] == "EleutherAI/pythia-70m"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, D, generator=g) * 2 + 0.5
    with torch.no_grad():
        f = ae.encode(x)
        x_hat = ae.decode(f)
    agree(ours, x, f, x_hat)
    ours.save(tmp_path / "saelab")
    agree(load_sae(tmp_path / "saelab"), x, f, x_hat)


TRAINED = {"StandardTrainer": "relu", "StandardTrainerAprilUpdate": "relu", "TopKTrainer": "topk",
           "BatchTopKTrainer": "batchtopk", "MatryoshkaBatchTopKTrainer": "batchtopk", "JumpReluTrainer": "jumprelu",
           "GatedSAETrainer": "jumprelu"}


@pytest.mark.parametrize("trainer", sorted(TRAINED))
def test_trained_by_dictionary_learning(tmp_path, agree, dl, trainer):
    """40 steps of the library's own trainer, saved as its training loop saves (config.json, ae.pt)."""
    cls = dl.trainers[trainer]
    wanted = dict(steps=40, activation_dim=D, dict_size=F, k=K, layer=3, lm_name="m", warmup_steps=5,
                  sparsity_warmup_steps=5, threshold_start_step=5, device="cpu", submodule_name="resid_post_layer_3",
                  group_fractions=[0.25, 0.75], seed=0)
    params = inspect.signature(cls.__init__).parameters
    tr = cls(**{k: v for k, v in wanted.items() if k in params})
    x = torch.randn(2048, D, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    for step in range(40):
        tr.update(step, x[(step * 256) % 2048:][:256])
    (tmp_path / "trainer_0").mkdir()
    (tmp_path / "trainer_0" / "config.json").write_text(json.dumps({"trainer": tr.config}, indent=4, default=str))
    torch.save({k: v.cpu() for k, v in tr.ae.state_dict().items()}, tmp_path / "trainer_0" / "ae.pt")
    ours = load_foreign(tmp_path)
    assert ours.cfg.architecture == TRAINED[trainer] and ours.metadata["hook"] == "model.layers.3"
    with torch.no_grad():
        f = tr.ae.encode(x[:128])
        x_hat = tr.ae.decode(f)
    agree(ours, x[:128], f, x_hat)


def test_training_backup_is_scaled_like_the_training_loop(tmp_path, agree, dl):
    """An interrupted run's ae.pt ({"ae": ..., "norm_factor": c}) equals the finished SAE after scale_biases(c)."""
    ae = _build(dl, "AutoEncoderTopK")
    (tmp_path / "run").mkdir()
    config = {"dict_class": "AutoEncoderTopK", "activation_dim": D, "dict_size": F, "k": K, "lm_name": "m"}
    torch.save({"step": 7, "ae": ae.state_dict(), "config": config, "norm_factor": 3.0}, tmp_path / "run" / "ae.pt")
    ours = load_foreign(tmp_path / "run" / "ae.pt", format="dictionary-learning")  # the file itself, no config.json
    ae.scale_biases(3.0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, D, generator=g) * 6
    with torch.no_grad():
        f = ae.encode(x)
        agree(ours, x, f, ae.decode(f))
    assert any("training backup (step 7)" in n for n in ours.metadata["imported"]["notes"])


def test_ae_pt_is_read_weights_only(tmp_path, dl):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "x").mkdir()
    torch.save({"encoder.weight": torch.zeros(F, D), "evil": Payload()}, tmp_path / "x" / "ae.pt")
    with pytest.raises(UsageError, match=r"weights_only=True"):
        load_foreign(tmp_path / "x")
    (tmp_path / "x" / "ae.pt").write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="not a readable torch file|holds more than tensors"):
        load_foreign(tmp_path / "x")


def test_topk_and_batchtopk_need_config_to_tell_apart(tmp_path, dl):
    ae = _build(dl, "BatchTopKSAE")
    (tmp_path / "r").mkdir()
    torch.save(ae.state_dict(), tmp_path / "r" / "ae.pt")
    with pytest.raises(UsageError, match="AutoEncoderTopK and BatchTopKSAE.*config.json"):
        load_foreign(tmp_path / "r")


def test_declared_sizes_must_match(tmp_path, dl):
    _save(_build(dl, "AutoEncoder"), tmp_path / "t", "AutoEncoder")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["trainer"]["dict_size"] = F * 2
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"encoder\.weight has shape \[48, 16\], expected \[96, 16\]"):
        load_foreign(tmp_path / "t")
