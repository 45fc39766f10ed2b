"""levstream.torch.LevSelfAttention: shapes, gradients, equality with levstream.lev_attention (NumPy)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from naive import leverage_svd

import levstream as ls


def test_import_levstream_does_not_import_torch():
    code = "import sys, levstream; sys.exit(1 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    assert proc.returncode == 0, "`import levstream` imported torch"


torch = pytest.importorskip("torch", reason="torch not installed (optional extra levstream[torch]; "
                                            "`pip install torch==2.13.0`)")
from levstream.torch import LevSelfAttention, leverage_scores_torch


def make(top_k=6, **kw):
    torch.manual_seed(0)
    return LevSelfAttention(12, 3, top_k=top_k, **kw).double()


def test_shapes_and_full_attention_equals_torch_multihead_attention():
    layer = make(top_k=None)
    x = torch.randn(2, 20, 12, dtype=torch.float64)
    assert layer(x).shape == (2, 20, 12)
    ref = torch.nn.MultiheadAttention(12, 3, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias]))
        ref.out_proj.weight.copy_(layer.out_proj.weight)
        ref.out_proj.bias.copy_(layer.out_proj.bias)
    torch.testing.assert_close(layer(x), ref(x, x, x, need_weights=False)[0], rtol=1e-10, atol=1e-12)
    # top_k >= n is the full attention too
    layer.top_k = 20
    torch.testing.assert_close(layer(x), ref(x, x, x, need_weights=False)[0], rtol=1e-10, atol=1e-12)


def test_leverage_scores_torch_match_numpy():
    K = torch.randn(2, 3, 30, 5, dtype=torch.float64)
    tau = leverage_scores_torch(K)
    aff = leverage_scores_torch(K, affine=True)
    for b in range(2):
        for h in range(3):
            k = K[b, h].numpy()
            np.testing.assert_allclose(tau[b, h].numpy(), leverage_svd(k), rtol=1e-9, atol=1e-13)
            np.testing.assert_allclose(aff[b, h].numpy(), leverage_svd(np.hstack([k, np.ones((30, 1))])),
                                       rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("selection", ["leverage", "leverage_affine", "query_mean"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_lev_attention_in_numpy(selection, causal):
    layer = make(top_k=7, selection=selection, always_keep=(0,), causal=causal)
    x = torch.randn(3, 25, 12, dtype=torch.float64)
    Q, K, V = layer.project_qkv(x)
    out, idx = layer.attend(Q, K, V, return_indices=True)
    want, want_idx = ls.lev_attention(Q.detach().numpy(), K.detach().numpy(), V.detach().numpy(), top_k=7,
                                      selection=selection, always_keep=[0], causal=causal, return_indices=True)
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-10, atol=1e-12)


def test_gradcheck_through_kept_keys():
    layer = LevSelfAttention(4, 2, top_k=3).double()
    x = torch.randn(1, 9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-6, atol=1e-6)
    causal = LevSelfAttention(4, 2, top_k=3, causal=True).double()
    assert torch.autograd.gradcheck(lambda t: causal(t), (x,), eps=1e-6, atol=1e-6)


def test_gradients_reach_every_parameter_and_only_kept_values():
    layer = make(top_k=4)
    x = torch.randn(1, 16, 12, dtype=torch.float64)
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
