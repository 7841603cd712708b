"""JumpReLU specifics: the straight-through pseudo-gradients by hand, and the data-dependent b_enc init."""
import torch

from saelab.saes import REGISTRY, make_sae
from saelab.saes.jumprelu import _JumpReLUFn, _StepFn


def test_pseudo_gradients_known_values():
    """θ = 1, ε = 0.1: only z = 1.02 lies inside the kernel window |z - θ| < ε/2."""
    z = torch.tensor([[0.5, 1.02, 2.0, 1.2]], requires_grad=True)
    theta = torch.ones(4, requires_grad=True)
    y = _JumpReLUFn.apply(z, theta, 0.1)
    torch.testing.assert_close(y, torch.tensor([[0.0, 1.02, 2.0, 1.2]]))
    y.sum().backward()
    assert z.grad.tolist() == [[0.0, 1.0, 1.0, 1.0]]            # H(z - θ): passes where z > θ
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -10.0, 0.0, 0.0]))  # -(θ/ε) K((z-θ)/ε)
    z.grad, theta.grad = None, None
    h = _StepFn.apply(z, theta * 2, 0.1)  # θ = 2: z = 2.0 is at the step (not above), window [1.95, 2.05)
    assert h.tolist() == [[0.0, 0.0, 0.0, 0.0]]
    h.sum().backward()
    assert z.grad is None                                        # the L0 term trains θ only
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, 0.0, -20.0, 0.0]))  # -(1/ε) K, times dθ'/dθ = 2


def test_init_density_sets_firing_rate():
    """After init_from_data_, each latent fires on init_density of the sample (41 of 4096 at 1%)."""
    sae = make_sae(REGISTRY["jumprelu"][1](d_in=16, d_sae=300, init_density=0.01))
    x = torch.randn(4096, 16) * 3 + 1
    sae.init_from_data_(x)
    with torch.no_grad():
        fires_F = (sae.encode(x) != 0).sum(0)
    assert fires_F.min() >= 40 and fires_F.max() <= 42, (fires_F.min(), fires_F.max())
    torch.testing.assert_close(sae.threshold_F.detach(), torch.full((300,), 0.1))  # θ itself untouched
    plain = make_sae(REGISTRY["jumprelu"][1](d_in=16, d_sae=300, init_density=0.0))
    plain.init_from_data_(x)
    assert torch.equal(plain.b_enc_F.detach(), torch.zeros(300))
