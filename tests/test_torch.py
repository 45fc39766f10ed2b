"""levstream.torch.LevSelfAttention: shapes, gradients, equality with levstream.lev_attention (NumPy)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import TORCH_FLOAT32_ATOL, TORCH_FLOAT32_RTOL, TORCH_FLOAT64_ATOL, TORCH_FLOAT64_RTOL
from naive import leverage_svd

import levstream as ls


def test_import_levstream_does_not_import_torch():
    code = "import sys, levstream; sys.exit(1 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    assert proc.returncode == 0, "`import levstream` imported torch"


torch = pytest.importorskip("torch", reason="torch not installed (optional extra levstream[torch]; "
                                            "`pip install torch==2.13.0`)")
from levstream.torch import LevSelfAttention, leverage_scores_torch

#: Every numerical test runs in float64 and in float32 (torch's default dtype), each with its own
#: tolerance.
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]
TOLERANCE = {torch.float64: {"rtol": TORCH_FLOAT64_RTOL, "atol": TORCH_FLOAT64_ATOL},
             torch.float32: {"rtol": TORCH_FLOAT32_RTOL, "atol": TORCH_FLOAT32_ATOL}}


def make(top_k=6, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return LevSelfAttention(12, 3, top_k=top_k, **kw).to(dtype)


def as_float64(t: torch.Tensor) -> np.ndarray:
    """The exact float64 values of a tensor of either dtype (the reference computes in float64)."""
    return t.detach().to(torch.float64).numpy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes_and_full_attention_equals_torch_multihead_attention(dtype):
    layer = make(top_k=None, dtype=dtype)
    x = torch.randn(2, 20, 12, dtype=dtype)
    assert layer(x).shape == (2, 20, 12) and layer(x).dtype == dtype
    # the reference: torch's own attention, in float64 from the same (float64-converted) weights
    ref = torch.nn.MultiheadAttention(12, 3, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias]))
        ref.out_proj.weight.copy_(layer.out_proj.weight)
        ref.out_proj.bias.copy_(layer.out_proj.bias)
    x64 = x.double()
    want = ref(x64, x64, x64, need_weights=False)[0]
    torch.testing.assert_close(layer(x).double(), want, **TOLERANCE[dtype])
    # top_k >= n is the full attention too
    layer.top_k = 20
    torch.testing.assert_close(layer(x).double(), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_leverage_scores_torch_match_numpy(dtype):
    K = torch.randn(2, 3, 30, 5, dtype=dtype)
    tau = leverage_scores_torch(K)
    aff = leverage_scores_torch(K, affine=True)
    assert tau.dtype == aff.dtype == dtype
    # float64 keeps the tighter tolerance this test always had: scores are well-conditioned here
    tol = {"rtol": 1e-9, "atol": 1e-13} if dtype == torch.float64 else TOLERANCE[dtype]
    for b in range(2):
        for h in range(3):
            k = as_float64(K[b, h])
            np.testing.assert_allclose(as_float64(tau[b, h]), leverage_svd(k), **tol)
            affine = leverage_svd(np.hstack([k, np.ones((30, 1))]))
            np.testing.assert_allclose(as_float64(aff[b, h]), affine, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("selection", ["leverage", "leverage_affine", "query_mean"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_lev_attention_in_numpy(selection, causal, dtype):
    """The NumPy reference gets the layer's projections converted to float64: in float32 the
    selected keys are the same (fixed seed, no near-ties) and outputs agree to float32 accuracy."""
    layer = make(top_k=7, selection=selection, always_keep=(0,), causal=causal, dtype=dtype)
    x = torch.randn(3, 25, 12, dtype=dtype)
    Q, K, V = layer.project_qkv(x)
    out, idx = layer.attend(Q, K, V, return_indices=True)
    assert out.dtype == dtype
    want, want_idx = ls.lev_attention(as_float64(Q), as_float64(K), as_float64(V), top_k=7,
                                      selection=selection, always_keep=[0], causal=causal, return_indices=True)
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(as_float64(out), want, **TOLERANCE[dtype])


def test_gradcheck_through_kept_keys():
    layer = LevSelfAttention(4, 2, top_k=3).double()
    x = torch.randn(1, 9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-6, atol=1e-6)
    causal = LevSelfAttention(4, 2, top_k=3, causal=True).double()
    assert torch.autograd.gradcheck(lambda t: causal(t), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_reach_every_parameter_and_only_kept_values(dtype):
    layer = make(top_k=4, dtype=dtype)
    x = torch.randn(1, 16, 12, dtype=dtype)
    layer(x).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    Q, K, V = layer.project_qkv(x)
    V = V.detach().requires_grad_(True)
    out, idx = layer.attend(Q.detach(), K.detach(), V, return_indices=True)
    out.sum().backward()
    g = V.grad.abs().sum(-1)  # (1, heads, n): nonzero exactly at the kept keys
    for h in range(3):
        assert set(torch.nonzero(g[0, h]).flatten().tolist()) == set(idx[0, h].tolist())


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        LevSelfAttention(10, 3)
    with pytest.raises(ValueError, match="top_k"):
        LevSelfAttention(12, 3, top_k=0)
    with pytest.raises(ValueError, match="selection"):
        LevSelfAttention(12, 3, selection="norm")
    with pytest.raises(ValueError, match="shape"):
        make()(torch.randn(4, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="always_keep positions"):
        make(always_keep=(30,))(torch.randn(1, 16, 12, dtype=torch.float64))
