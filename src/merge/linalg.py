"""SVDs of concatenated task updates, computed from LoRA factors without densifying.

KnOTS needs the SVD of ``M = [dW_1 ... dW_n]`` and CART the SVDs of the centered updates
``dW_i - mean_j dW_j``. For LoRA updates ``dW_i = s_i B_i A_i`` every one of these
matrices lives in a subspace of dimension ``<= n r``, so thin QRs of the factors reduce
each problem to an SVD of an ``nr x nr`` core: exact, and independent of ``O`` and ``I``
except for the QRs (a dense SVD of one 4096 x 6*4096 matrix takes minutes on a CPU).

Every function here returns singular vectors already restricted to the components whose
singular value is ``> tol`` (the KnOTS authors drop ``s <= 1e-5``). Callers pass float64
tensors; the functions keep the input dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

DEFAULT_TOL = 1e-5


class ConcatSVD(NamedTuple):
    """``M = [dW_1 ... dW_n] = U diag(S) [Vh_1 ... Vh_n]`` (column concatenation).

    ``U: (O, k)``, ``S: (k,)`` descending, ``Vh: (n, k, I)`` with ``Vh[i] = V_i^T``, so
    ``dW_i = U diag(S) Vh[i]``.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


class RowConcatSVD(NamedTuple):
    """``M = [dW_1; ...; dW_n] = [U_1; ...; U_n] diag(S) Vh`` (row concatenation, ablation).

    ``U: (n, O, k)`` with ``U[i] = U_i``, ``S: (k,)``, ``Vh: (k, I)``, so
    ``dW_i = U[i] diag(S) Vh``.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def _keep(S: torch.Tensor, tol: float) -> int:
    """Number of leading (descending) singular values ``> tol``."""
    return int((S > tol).sum())


class FactoredCoefficients:
    """The per-task coefficients ``Vh[i]`` of a factored SVD, kept as ``C_i @ Q_i^T``.

    ``C_i: (k, q_i)`` and ``Q_i: (I, q_i)`` take ``(k + I) q_i`` numbers where ``Vh[i]`` takes
    ``k I`` (4x less for Llama-shaped r16 adapters). global reductions read every layer's
    coefficients several times; keeping the factors and multiplying on each read (one small
    matmul, bit-identical every time) keeps a whole model's merge in memory cheaply.
    """

    def __init__(self, C: list[torch.Tensor], Q: list[torch.Tensor]):
        self.C, self.Q = C, Q

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.C), self.C[0].shape[0], self.Q[0].shape[0]))

    def materialize(self) -> torch.Tensor:
        """``(n, k, I)``: ``Vh[i] = C_i Q_i^T``."""
        C0, Q0 = self.C[0], self.Q[0]
        out = torch.empty((len(self.C), C0.shape[0], Q0.shape[0]), dtype=C0.dtype, device=C0.device)
        for i, (C, Q) in enumerate(zip(self.C, self.Q)):
            torch.matmul(C, Q.T, out=out[i])
        return out


def factored_concat_svd(
    Bs: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    scales: Sequence[float],
    tol: float = DEFAULT_TOL,
    scaled: bool = False,
    lazy: bool = False,
) -> ConcatSVD:
    """SVD of ``[s_1 B_1 A_1, ..., s_n B_n A_n]`` without forming the ``O x nI`` matrix.

    ``scaled=True`` returns ``diag(S) V_i^T`` in ``Vh`` (what KnOTS merges), folded into the
    small factor so that no extra pass over the ``(n, k, I)`` result is needed.
    ``lazy=True`` returns ``Vh`` as :class:`FactoredCoefficients` (materialize on use).

    ``M = Q_B R_B blockdiag(R_i^T) blockdiag(Q_i^T)`` with ``Q_B R_B = qr([s_i B_i])`` and
    ``Q_i R_i = qr(A_i^T)``; the SVD ``U_c S V_c^T`` of the small core
    ``R_B blockdiag(R_i^T)`` gives ``U = Q_B U_c`` and ``V_i = Q_i V_c[block i]``.
    Cost: ``O(O (nr)^2 + n I r^2 + (nr)^3)``.
    """
    if not (len(Bs) == len(As) == len(scales)) or not Bs:
        raise ValueError("factored_concat_svd needs one (B, A, scale) per task, at least one task")
    Bcat = torch.cat([B * s for B, s in zip(Bs, scales)], dim=1)  # (O, sum r_i)
    QB, RB = torch.linalg.qr(Bcat)  # (O, p), (p, nr), p = min(O, nr)
    if len({A.shape for A in As}) == 1:  # equal ranks: one batched QR for every task
        Qb, Rb = torch.linalg.qr(torch.stack(As).transpose(1, 2))
        factors = list(zip(Qb.unbind(0), Rb.unbind(0)))
    else:
        factors = [torch.linalg.qr(A.T) for A in As]  # (I, q_i), (q_i, r)
    Qs, blocks, col = [], [], 0
    for A, (Q, R) in zip(As, factors):
        r = A.shape[0]
        Qs.append(Q)
        blocks.append(RB[:, col:col + r] @ R.T)  # (p, q_i): s_i B_i A_i = QB @ block @ Q^T
        col += r
    Uc, S, Vch = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    k = _keep(S, tol)
    U = QB @ Uc[:, :k]
    small = Vch[:k] * S[:k, None] if scaled else Vch[:k]
    Cs, off = [], 0
    for Q in Qs:  # V_i^T = V_c[block i]^T Q_i^T
        Cs.append(small[:, off:off + Q.shape[1]].contiguous())
        off += Q.shape[1]
    coefficients = FactoredCoefficients(Cs, Qs)
    return ConcatSVD(U, S[:k], coefficients if lazy else coefficients.materialize())


def dense_concat_svd(updates: Sequence[torch.Tensor], tol: float = DEFAULT_TOL, scaled: bool = False) -> ConcatSVD:
    """Dense counterpart of :func:`factored_concat_svd` (full-rank updates)."""
    n = len(updates)
    I = updates[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(list(updates), dim=1), full_matrices=False)
    k = _keep(S, tol)
    Vh = Vh[:k]
    if scaled:
        Vh = Vh * S[:k, None]
    return ConcatSVD(U[:, :k], S[:k], Vh.reshape(k, n, I).transpose(0, 1).contiguous())


def factored_row_concat_svd(
    Bs: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    scales: Sequence[float],
    tol: float = DEFAULT_TOL,
) -> RowConcatSVD:
    """SVD of ``[s_1 B_1 A_1; ...; s_n B_n A_n]`` (stacked along ``O``) from the factors.

    The transpose of the column problem on ``dW_i^T = s_i A_i^T B_i^T``.
    """
    t = factored_concat_svd([A.T for A in As], [B.T for B in Bs], scales, tol)
    return RowConcatSVD(t.Vh.transpose(1, 2), t.S, t.U.T)


def dense_row_concat_svd(updates: Sequence[torch.Tensor], tol: float = DEFAULT_TOL) -> RowConcatSVD:
    """Dense counterpart of :func:`factored_row_concat_svd`."""
    n, O = len(updates), updates[0].shape[0]
    U, S, Vh = torch.linalg.svd(torch.cat(list(updates), dim=0), full_matrices=False)
    k = _keep(S, tol)
    return RowConcatSVD(U[:, :k].reshape(n, O, k), S[:k], Vh[:k])


class CenteredCores(NamedTuple):
    """LoRA updates in a shared orthonormal frame: ``dW_i = Q_B (mean + C[i]) Q_A^T``.

    ``Q_B: (O, p)``, ``Q_A: (I, q)``, ``mean: (p, q)`` is the core of ``mean_j dW_j`` and
    ``C: (n, p, q)`` the cores of the centered updates ``c_i = dW_i - mean_j dW_j``.
    Because ``Q_B`` and ``Q_A`` have orthonormal columns, the SVD of ``C[i]`` mapped by
    them is the SVD of ``c_i``, so truncating the core truncates ``c_i`` exactly.
    """

    QB: torch.Tensor
    QA: torch.Tensor
    mean: torch.Tensor
    C: torch.Tensor


def centered_lowrank_cores(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], scales: Sequence[float]
) -> CenteredCores:
    """Cores of the centered LoRA updates (see :class:`CenteredCores`), ``O((O+I)(nr)^2)``."""
    QB, RB = torch.linalg.qr(torch.cat([B * s for B, s in zip(Bs, scales)], dim=1))
    QA, RA = torch.linalg.qr(torch.cat(list(As), dim=0).T)
    cores, col = [], 0
    for A in As:
        r = A.shape[0]
        cores.append(RB[:, col:col + r] @ RA[:, col:col + r].T)
        col += r
    D = torch.stack(cores)
    mean = D.mean(dim=0)
    return CenteredCores(QB, QA, mean, D - mean)
