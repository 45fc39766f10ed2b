"""PyTorch layer: multi-head self-attention over the top-k keys of each head by leverage score.

Optional extra: install torch first and alone (``pip install torch==2.13.0``), then ``pip install -e
'.[torch]'``.  ``import levstream`` never imports this module or torch; import it explicitly::

    from levstream.torch import LevSelfAttention

The selection (which keys each head keeps) is computed on the batch, in torch, without gradient: it is a
discrete choice.  The attention over the kept keys is ordinary differentiable torch code, so gradients
flow to the queries, keys and values of the kept keys and to all projection weights.  With
``top_k=None`` (or ``top_k >= n``) the layer is exact multi-head softmax self-attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "levstream.torch needs PyTorch: install it first and alone with "
        "`pip install torch==2.13.0`, then `pip install -e '.[torch]'`."
    ) from exc

__all__ = ["LevSelfAttention", "leverage_scores_torch", "select_keys"]


def leverage_scores_torch(K: torch.Tensor, affine: bool = False) -> torch.Tensor:
    """Leverage scores of the rows of every stacked matrix ``K`` (..., n, d), without gradient.

    ``tau_j = ||U_j||^2`` over the left singular vectors whose singular value exceeds ``max(n, d) *
    eps_machine * sigma_max`` (NumPy's ``matrix_rank`` rule).  These scores rank keys for a top-k selection,
    which carries no guarantee; :func:`levstream.leverage_scores` (which :func:`levstream.lev_attention`'s
    ``eps`` selection uses) also equilibrates the columns before deciding the rank and scores 1 a key along a
    direction the tolerance cuts, and can differ from these on keys near rounding.  ``affine=True`` scores
    ``[K, 1]`` instead (invariant to adding one vector to every key, as softmax is).
    """
    with torch.no_grad():
        K = K.detach()
        if affine:
            K = torch.cat(
                [K, torch.ones(K.shape[:-1] + (1,), dtype=K.dtype, device=K.device)], dim=-1
            )
        n, d = K.shape[-2:]
        U, s, _ = torch.linalg.svd(K, full_matrices=False)
        tol = max(n, d) * torch.finfo(K.dtype).eps * s[..., :1]
        keep = ((s > tol) & (s > 0)).to(K.dtype)
        return torch.einsum("...nr,...nr,...r->...n", U, U, keep)


def select_keys(scores: torch.Tensor, k: int, always_keep: Sequence[int] = ()) -> torch.Tensor:
    """Positions (..., k) of the ``k`` largest scores, ties to the lower index, ascending; ``always_keep`` forced in."""
    n = scores.shape[-1]
    scores = scores.clone()
    for pos in always_keep:
        scores[..., pos % n] = math.inf
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


class LevSelfAttention(nn.Module):
    """Multi-head self-attention in which every head attends only to its top-k keys by leverage score.

    Parameters
    ----------
    embed_dim : int
        Model width; must be divisible by ``num_heads``.
    num_heads : int
    top_k : int or None
        Keys kept per head (per sequence); ``None`` keeps all keys (exact softmax attention).
    selection : {"leverage", "leverage_affine", "query_mean"}
        Leverage scores of each head's keys ``K`` or of ``[K, 1]``, or the keys the mean query of the
        sequence weights most (largest ``<qbar, k_j>``; see :func:`levstream.lev_attention`).
    always_keep : sequence of int
        Key positions always kept (e.g. ``(0,)`` for a class token); they count towards ``top_k``.
    causal : bool
        Query ``i`` attends only to kept keys ``j <= i``; a query with none gets a zero output.
    bias : bool
        Biases in the q/k/v/output projections.
    dropout : float
        Dropout on the attention weights (training only).

    Notes
    -----
    Shapes: input ``(batch, n, embed_dim)`` (batch first), output the same.

    Examples
    --------
    >>> import torch
    >>> from levstream.torch import LevSelfAttention
    >>> layer = LevSelfAttention(32, 4, top_k=8)
    >>> layer(torch.randn(2, 50, 32)).shape
    torch.Size([2, 50, 32])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        top_k: int | None = 32,
        *,
        selection: str = "leverage",
        always_keep: Sequence[int] = (),
        causal: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads; got {embed_dim} and {num_heads}."
            )
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None; got {top_k}.")
        if selection not in ("leverage", "leverage_affine", "query_mean"):
            raise ValueError(
                f"selection must be 'leverage', 'leverage_affine' or 'query_mean'; got {selection!r}."
            )
        if top_k is not None and len(always_keep) > top_k:
            raise ValueError(f"always_keep names {len(always_keep)} keys, more than top_k={top_k}.")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.top_k, self.selection, self.always_keep, self.causal = (
            top_k,
            selection,
            tuple(always_keep),
            causal,
        )
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, top_k={self.top_k}, "
            f"selection={self.selection!r}, causal={self.causal}"
        )

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries, keys and values, each of shape (batch, heads, n, head_dim)."""
        B, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, n, self.num_heads, self.head_dim).transpose(1, 2)

        return split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))

    def attend(
        self, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, return_indices: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention of ``Q`` over each head's selected keys; inputs (..., n, head_dim).

        Equals ``levstream.lev_attention(Q, K, V, top_k=self.top_k, selection=self.selection,
        always_keep=self.always_keep, causal=self.causal)`` (with dropout off), but where scores that are equal
        in exact arithmetic (``n <= head_dim``, duplicated keys) tie: the two compute them in different
        orders, so their last bits, and the keys kept among the tied, may differ.
        """
        n = K.shape[-2]
        if self.top_k is None or self.top_k >= n:
            idx = torch.arange(n, device=K.device).expand(K.shape[:-2] + (n,))
        else:
            if any(not -n <= pos < n for pos in self.always_keep):
                raise ValueError(
                    f"always_keep positions must lie in [-{n}, {n}) for {n} keys; "
                    f"got {list(self.always_keep)}."
                )
            if self.selection == "query_mean":
                with torch.no_grad():  # the selection is not differentiated, as for leverage
                    scores = (K @ Q.mean(dim=-2).unsqueeze(-1)).squeeze(-1)
            else:
                scores = leverage_scores_torch(K, affine=self.selection == "leverage_affine")
            idx = select_keys(scores, self.top_k, self.always_keep)
        gather = idx.unsqueeze(-1)
        K_sel = torch.gather(K, -2, gather.expand(idx.shape + (K.shape[-1],)))
        V_sel = torch.gather(V, -2, gather.expand(idx.shape + (V.shape[-1],)))
        logits = Q @ K_sel.transpose(-1, -2) / math.sqrt(Q.shape[-1])
        if self.causal:
            m = Q.shape[-2]
            visible = idx.unsqueeze(-2) <= (torch.arange(m, device=Q.device) + n - m).unsqueeze(-1)
            logits = logits.masked_fill(~visible, -math.inf)
            top = (
                logits.amax(dim=-1, keepdim=True).detach().clamp_min(torch.finfo(logits.dtype).min)
            )
            w = torch.exp(logits - top)
            weights = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        else:
            weights = torch.softmax(logits, dim=-1)
        out = self.dropout(weights) @ V_sel
        return (out, idx) if return_indices else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of ``x`` (batch, n, embed_dim); returns (batch, n, embed_dim)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x must have shape (batch, n, {self.embed_dim}); got {tuple(x.shape)}."
            )
        Q, K, V = self.project_qkv(x)
        out = self.attend(Q, K, V)
        assert isinstance(out, torch.Tensor)  # attend returns the weights too only when asked
        B, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, n, self.embed_dim))
