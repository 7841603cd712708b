"""Shared check of the import tests: a saelab SAE and a reference agree on the same inputs."""
import pytest
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture
def agree():
    """check(sae, x_BD, f_ref_BF, x_hat_ref_BD): same active latents, relative error <= 1e-5 on both."""

    def check(sae, x_BD, f_ref_BF, x_hat_ref_BD, tol=1e-5):
        with torch.no_grad():
            x_hat_BD, f_BF = sae(x_BD)
        assert f_BF.shape == f_ref_BF.shape and x_hat_BD.shape == x_hat_ref_BD.shape
        assert torch.equal(f_BF != 0, f_ref_BF != 0), "different latents fire"
        assert rel_err(f_BF, f_ref_BF) <= tol, rel_err(f_BF, f_ref_BF)
        assert rel_err(x_hat_BD, x_hat_ref_BD) <= tol, rel_err(x_hat_BD, x_hat_ref_BD)
        assert (f_ref_BF != 0).any() and (f_ref_BF == 0).any(), "a test input must make some latents fire, not all"

    return check
