"""The three orthogonalizations of PowerSGD's P: orthonormal columns spanning P's column space, on fresh random
inputs, and a full basis for a zero P once eps * I is added (the paper's guard, E.2 step 5)."""
import pytest
import torch

from dalle_ds.dist.orthogonalize import ORTHOGONALIZERS, add_eps_identity, get_orthogonalizer


@pytest.mark.parametrize("name", sorted(ORTHOGONALIZERS))
@pytest.mark.parametrize("shape", [(7, 3), (64, 8), (5, 5)])
def test_orthonormal_basis_of_the_same_space(name, shape):
    p = torch.randn(*shape, dtype=torch.float64)
    q = ORTHOGONALIZERS[name](p)
    assert q.shape == p.shape
    assert torch.allclose(q.t() @ q, torch.eye(shape[1], dtype=torch.float64), atol=1e-10)
    assert torch.allclose(q @ (q.t() @ p), p, atol=1e-10)  # P lies in span(Q)


@pytest.mark.parametrize("name", sorted(ORTHOGONALIZERS))
def test_zero_p_gets_a_basis_after_eps_identity(name):
    p = add_eps_identity(torch.zeros(6, 3), 1e-6)
    q = ORTHOGONALIZERS[name](p)
    assert torch.allclose(q.t() @ q, torch.eye(3), atol=1e-6)


def test_householder_needs_tall_input_and_names_are_checked():
    with pytest.raises(ValueError, match="rows >= columns"):
        ORTHOGONALIZERS["householder"](torch.randn(2, 3))
    with pytest.raises(ValueError, match="unknown orthogonalization"):
        get_orthogonalizer("cholesky")
