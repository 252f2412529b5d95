"""The model zoo (tests/zoo.py) against float64 finite differences of gradients.

For every case: either the operator's own path is right (``expect="exact"``: verification passes
and the product matches the reference), or PyTorch's second derivatives are wrong for the
construct (``expect="caught"``: verification fails and names the cause, and the
finite-difference backend built from the same operator matches the reference).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _reference import fd_hvp
from zoo import build_zoo

from lightning_rpe.curvature.hessian import HessianOperator
from lightning_rpe.curvature.verify import verify_operator

CASES = {case.name: case for case in build_zoo()}
TOL = 1e-6


def _reference(case, v):
    if case.frozen:  # coordinates that never train: the Hessian over the others (rows and columns)
        mask = torch.ones_like(v)
        mask[list(case.frozen)] = 0
        return mask * fd_hvp(case.reference, case.loss_fn, case.batches, mask * v)
    return fd_hvp(case.reference, case.loss_fn, case.batches, v)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", sorted(CASES))
def test_zoo_product_right_or_caught(name):
    case = CASES[name]
    flags = {n: m.training for n, m in case.model.named_modules()}
    state = {k: t.clone() for k, t in case.model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation / checkpoint notices
        # the AD path explicitly: backend="auto" already avoids the modules known to be wrong (below)
        op = HessianOperator(case.model, case.loss_fn, case.batches, dtype=torch.float64,
                             **{"backend": "autograd", **case.settings})
        result = verify_operator(op, generator=torch.Generator().manual_seed(0))
        v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        ref = _reference(case, v)
        if case.expect == "exact":
            assert result.passed, result
            assert result.rel_error <= TOL and result.asymmetry <= TOL
            assert _rel(op.matvec(v), ref) <= TOL
        else:
            assert not result.passed, result
            assert any(case.suspect in s for s in result.suspects), result.suspects
            fd = op.with_backend("finite_difference")
            assert fd.n_hvp == 0 and fd.backend == "finite_difference"
            assert _rel(fd.matvec(v), ref) <= TOL
            assert fd.n_hvp == 1
            assert verify_operator(fd, generator=torch.Generator().manual_seed(0)).passed
    assert result.n_hvp in (0, 2) and result.n_gradients in ((2,) if result.passed else (0, 4, 6))
    # nothing observable changed: flags and state bit for bit
    assert {n: m.training for n, m in case.model.named_modules()} == flags
    after = case.model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("name", sorted(CASES))
def test_zoo_in_float32_no_false_alarm_and_fd_within_its_accuracy(name):
    case = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = HessianOperator(case.model, case.loss_fn, case.batches, dtype=torch.float32,
                             **{"backend": "autograd", **case.settings})
        result = verify_operator(op)
        assert result.passed == (case.expect == "exact"), result
        v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        product = (op if case.expect == "exact" else op.with_backend("finite_difference")).matvec(v.float())
    assert _rel(product.double(), _reference(case, v)) <= (1e-5 if case.expect == "exact" else 1e-3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_zoo_auto_backend_avoids_modules_known_to_be_wrong(name):
    from lightning_rpe.curvature._functional import module_causes

    case = CASES[name]
    known = [c for c in module_causes(case.model) if "double backward" in c]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        op = HessianOperator(case.model, case.loss_fn, case.batches, dtype=torch.float64, **case.settings)
    if "backend" in case.settings:
        return
    said = [str(w.message) for w in record if "uses finite differences of gradients" in str(w.message)]
    if known:
        assert op.backend == "finite_difference" and len(said) == 1
        v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert _rel(op.matvec(v), _reference(case, v)) <= TOL
    else:
        assert op.backend != "finite_difference" and not said
