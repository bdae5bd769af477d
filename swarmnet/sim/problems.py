"""Vectorized tasks: the simulator's protocol for "n models in one [n, d] tensor".

Legend: n models, d coordinates, K rows of one gradient batch, B local batch (samples per
stochastic gradient), m training samples.

A simulator task is any object with these members (:class:`VectorTask`):

- ``name: str`` and ``dim: int`` (d);
- ``init(n, generator) -> Tensor[n, d]``: the initial models. Learning tasks return n equal
  rows (SPEC 4 item 6: identical initialization);
- ``draw(count, generator) -> Tensor[count, ...]``: the random inputs of ``count`` stochastic
  gradients (for the bundled tasks: B sample indices each). This is the **only** randomness a
  gradient may use: the simulator draws it per interaction, in interaction order, so the
  vectorized and the one-pair-at-a-time paths see identical samples. A task may accept an
  optional ``out=`` tensor of that shape to fill instead of allocating (the simulator then
  reuses one buffer: tens of MB per random block at 10^4 nodes, page faults otherwise);
- ``grad(x_K, draws_K) -> Tensor[K, d]``: one stochastic gradient per row. Row k may depend on
  ``x_K[k]`` and ``draws_K[k]`` only, and must be computed by the same kernel whatever K is
  (then a layer of disjoint pairs gives bit-for-bit the same rows as one pair at a time);
- ``metrics(x_K) -> dict[str, Tensor[K]]``: float64 per-model numbers; ``"loss"`` is required
  (for least squares the excess loss f(x) - f*, the quantity SPEC 1.5 tabulates);
- ``to(device, dtype) -> task``: a copy whose tensors live on ``device`` in ``dtype``.

``--task module:function`` imports ``function`` and calls it as ``function(batch=B, seed=S,
**options)``; it must return such an object.

Bundled: ``lsq`` (synthetic least squares of SPEC 1.5, built by
:func:`swarmnet.tasks.lsq.make_problem`), ``logreg`` (L2-regularized logistic regression on
scikit-learn's breast-cancer data, :mod:`swarmnet.tasks.datasets`) and ``gossip`` (no
gradients, random initial models: pure averaging, SPEC 3.5 item 10). The two linear models
share :class:`LinearModelTask`: z = A_S x is a sampled dense-dense product and the gradient
A_S^T r / B a weighted row sum, both without materializing the gathered rows A_S on a CPU.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.nn import functional as F

from swarmnet.errors import ConfigError
from swarmnet.tasks import call_factory, datasets, import_factory
from swarmnet.tasks.logreg import check_l2
from swarmnet.tasks.lsq import make_problem, objective


@runtime_checkable
class VectorTask(Protocol):
    """What the simulator needs from a task (see the module docstring for the contract)."""

    name: str
    dim: int

    def init(self, n: int, generator: torch.Generator) -> Tensor: ...

    def draw(self, count: int, generator: torch.Generator) -> Tensor: ...

    def grad(self, x_K: Tensor, draws_K: Tensor) -> Tensor: ...

    def metrics(self, x_K: Tensor) -> dict[str, Tensor]: ...

    def to(self, device: torch.device | str, dtype: torch.dtype) -> VectorTask: ...


def gathered_dot(features_MD: Tensor, index_KB: Tensor, x_KD: Tensor) -> Tensor:
    """z[k, s] = features[index[k, s]] . x[k], shape [K, B].

    On a CPU this is a sampled dense-dense product (SDDMM) on a CSR pattern holding the sample
    indices: it never writes the gathered [K, B, d] rows, which is what makes a layer's forward
    pass cheap there. Elsewhere: one gather and a batched matmul. Each entry is one dot product
    computed the same way whatever K is (the exactness tests rely on that).
    """
    k, b = index_KB.shape
    if x_KD.device.type != "cpu":
        rows = features_MD[index_KB.long()]
        return torch.bmm(rows, x_KD.unsqueeze(2)).squeeze(2)
    crow, values = _csr_constants(k, b, index_KB.dtype, x_KD.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow,
            index_KB.reshape(-1),
            values,
            size=(k, features_MD.shape[0]),
            check_invariants=False,
        )
        z = torch.sparse.sampled_addmm(pattern, x_KD, features_MD.T, beta=0.0)
    return z.values().view(k, b)


_CSR: dict[tuple[int, torch.dtype, torch.dtype], tuple[Tensor, Tensor]] = {}


def _csr_constants(
    k: int, b: int, index_dtype: torch.dtype, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Row pointers 0, b, 2b, ... and zero values for a K x B pattern, kept between calls
    (read only: sampled_addmm never writes its input). The zeros matter: beta = 0 still
    multiplies the input values, and uninitialized memory may hold NaN."""
    key = (b, index_dtype, dtype)
    cached = _CSR.get(key)
    if cached is None or len(cached[0]) < k + 1:
        capacity = max(k, 2 * len(cached[0]) if cached else 0)
        cached = _CSR[key] = (
            torch.arange(0, capacity * b + 1, b, dtype=index_dtype),
            torch.zeros(capacity * b, dtype=dtype),
        )
    return cached[0][: k + 1], cached[1][: k * b]


_VECTOR_SPAN = 64
"""A multiple of every CPU vector loop's step (2 x 8 floats on AVX2, 2 x 16 on AVX-512)."""


def _sigmoid(z: Tensor) -> Tensor:
    """torch.sigmoid with every element on the vectorized path.

    Elementwise kernels run whole vectors and finish a tensor's last few elements with a scalar
    loop; for transcendental functions the two differ in the last bit, so the same row would
    round differently alone and inside a layer. Padding the flat length to a multiple of the
    vector step leaves no scalar remainder (on one thread; with more, a split of a tensor over
    32,768 elements may still land mid-vector).
    """
    flat = z.reshape(-1)
    pad = -flat.numel() % _VECTOR_SPAN
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    return torch.sigmoid(flat)[: z.numel()].view_as(z)


def weighted_row_sum(features_MD: Tensor, index_KB: Tensor, weight_KB: Tensor) -> Tensor:
    """g[k] = sum_s weight[k, s] * features[index[k, s]], shape [K, d] (a fused gather-sum)."""
    return F.embedding_bag(index_KB, features_MD, per_sample_weights=weight_KB, mode="sum")


@dataclass(frozen=True, kw_only=True, eq=False)
class LinearModelTask:
    """A linear model x in R^d on samples (a_s, y_s) with squared or logistic loss.

    Stochastic gradient of row k (B samples S drawn uniformly with replacement):
    ``A_S^T r / B + l2 * mask * x`` with r = z - y (squared) or sigmoid(z) - y (logistic).
    """

    name: str
    features: Tensor
    """A, [m, d] in the simulation dtype (a bias column is part of A where the model has one)."""
    targets: Tensor
    """y, [m]."""
    batch: int
    loss_kind: str = "squared"
    l2: float = 0.0
    l2_mask: Tensor | None = None
    """[d], 1 where the L2 penalty applies (not on a bias)."""
    evaluate: Callable[[Tensor], dict[str, Tensor]] | None = None
    """float64 per-model metrics from float64 models [K, d]."""

    def __post_init__(self) -> None:
        if self.loss_kind not in ("squared", "logistic"):
            raise ConfigError(f"{self.name}: loss_kind must be squared or logistic")
        if self.batch < 1:
            raise ConfigError(f"{self.name}: batch must be >= 1, got {self.batch}")
        if self.features.shape[0] >= 2**31:
            raise ConfigError(f"{self.name}: too many samples for int32 sample indices")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def init(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.zeros(n, self.dim, dtype=self.features.dtype, device=self.features.device)

    def draw(self, count: int, generator: torch.Generator, out: Tensor | None = None) -> Tensor:
        """B sample indices per gradient, uniform with replacement, int32 [count, B]."""
        if out is None:
            out = torch.empty(count, self.batch, dtype=torch.int32, device=self.features.device)
        return out.random_(0, self.features.shape[0], generator=generator)

    def grad(self, x_K: Tensor, draws_K: Tensor) -> Tensor:
        z = gathered_dot(self.features, draws_K, x_K)
        y = self.targets.index_select(0, draws_K.reshape(-1)).view_as(z)
        r = z - y if self.loss_kind == "squared" else _sigmoid(z) - y
        g = weighted_row_sum(self.features, draws_K, r) * (1.0 / self.batch)
        if self.l2:
            g = g + x_K * (self.l2_mask * self.l2 if self.l2_mask is not None else self.l2)
        return g

    def metrics(self, x_K: Tensor) -> dict[str, Tensor]:
        assert self.evaluate is not None
        return self.evaluate(x_K.detach().to(torch.float64))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LinearModelTask:
        mask = self.l2_mask.to(device, dtype) if self.l2_mask is not None else None
        return dataclasses.replace(
            self,
            features=self.features.to(device, dtype),
            targets=self.targets.to(device, dtype),
            l2_mask=mask,
        )


def lsq(
    batch: int = 1, seed: int = 0, dim: int = 32, samples: int = 10_000, noise: float = 1.0
) -> LinearModelTask:
    """Synthetic least squares of SPEC 1.5: f(x) = ||A x - b||^2 / (2m); metric: f(x) - f*."""
    a, b, _, f_opt = make_problem(samples, dim, noise, seed)

    def evaluate(x_K: Tensor) -> dict[str, Tensor]:
        value = objective(a, b, x_K.cpu())
        return {"loss": value - f_opt, "objective": value}

    return LinearModelTask(name="lsq", features=a, targets=b, batch=batch, evaluate=evaluate)


def logreg(batch: int = 128, seed: int = 0, l2: float = 1e-3) -> LinearModelTask:
    """L2-regularized logistic regression on the breast-cancer data (30 features and a bias).

    Metrics: ``loss`` = excess training objective f(x) - f* (f* from a full-batch solve, so
    curves of different n separate on a log axis as in SPEC 1.5 Fig. 1), ``objective``,
    held-out ``test_loss`` and ``test_error``.
    """
    check_l2(l2)
    xtr, ytr, xte, yte = datasets.breast_cancer(seed=seed)
    ones = lambda t: torch.cat((t, torch.ones(t.shape[0], 1, dtype=t.dtype)), 1)
    a_train, a_test = ones(xtr).double(), ones(xte).double()
    y_train, y_test = ytr.double(), yte.double()
    mask = torch.ones(a_train.shape[1], dtype=torch.float64)
    mask[-1] = 0.0  # no penalty on the bias, as in swarmnet.tasks.logreg

    def regularized(x_K: Tensor, a: Tensor, y: Tensor) -> Tensor:
        logits = x_K @ a.T
        data = F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")
        return data.mean(dim=1) + 0.5 * l2 * (x_K * mask).pow(2).sum(dim=1)

    f_opt = _logreg_minimum(seed, l2, lambda x: regularized(x, a_train, y_train), a_train.shape[1])

    def evaluate(x_K: Tensor) -> dict[str, Tensor]:
        x_K = x_K.cpu()
        value = regularized(x_K, a_train, y_train)
        return {
            "loss": value - f_opt,
            "objective": value,
            "test_loss": regularized(x_K, a_test, y_test),
            "test_error": (((x_K @ a_test.T) > 0).double() != y_test).double().mean(dim=1),
        }

    return LinearModelTask(
        name="logreg",
        features=a_train,
        targets=y_train,
        batch=batch,
        loss_kind="logistic",
        l2=l2,
        l2_mask=mask,
        evaluate=evaluate,
    )


_MINIMA: dict[tuple[int, float], float] = {}


def _logreg_minimum(seed: int, l2: float, f: Callable[[Tensor], Tensor], dim: int) -> float:
    key = (seed, l2)
    if key not in _MINIMA:
        _MINIMA[key] = _minimum(f, dim)
    return _MINIMA[key]


def _minimum(f: Callable[[Tensor], Tensor], dim: int) -> float:
    """min f over R^dim for a smooth strongly convex f of a [1, dim] float64 row: Newton's
    method with backtracking (a few dozen small solves for the bundled linear models)."""
    from torch.autograd.functional import hessian

    x = torch.zeros(1, dim, dtype=torch.float64)
    value = float(f(x))
    for _ in range(100):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(xg).sum(), xg)
        h = hessian(lambda v: f(v).sum(), x).reshape(dim, dim)
        step = torch.linalg.solve(h, grad.reshape(dim)).reshape(1, dim)
        size = 1.0
        while size > 1e-12:
            candidate = x - size * step
            new = float(f(candidate))
            if new <= value:
                break
            size /= 2
        if value - new <= 1e-16 * max(1.0, abs(value)):
            return min(value, new)
        x, value = candidate, new
    return value


@dataclass(frozen=True, kw_only=True, eq=False)
class GossipTask:
    """No objective at all: the models only average (SPEC 3.5 item 10). Random, zero-mean
    initial models; the gradient is 0 and consumes no randomness; "loss" is ||x||^2 / 2."""

    name: str = "gossip"
    dim: int = 8
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float64

    def init(self, n: int, generator: torch.Generator) -> Tensor:
        x = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=self.device)
        if n > 1:
            x -= x.mean(dim=0, keepdim=True)
        return x.to(self.dtype)

    def draw(self, count: int, generator: torch.Generator) -> Tensor:
        return torch.empty(count, 0, dtype=torch.int32, device=self.device)

    def grad(self, x_K: Tensor, draws_K: Tensor) -> Tensor:
        return torch.zeros_like(x_K)

    def metrics(self, x_K: Tensor) -> dict[str, Tensor]:
        return {"loss": 0.5 * x_K.double().pow(2).sum(dim=1)}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> GossipTask:
        return dataclasses.replace(self, device=torch.device(device), dtype=dtype)


def gossip(batch: int = 1, seed: int = 0, dim: int = 8) -> GossipTask:
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return GossipTask(dim=dim)


BUILTIN: dict[str, Callable[..., Any]] = {"lsq": lsq, "logreg": logreg, "gossip": gossip}


def load_vector_task(
    spec: str, *, batch: int, seed: int, options: Mapping[str, Any] | None = None
) -> Any:
    """Build ``lsq``, ``logreg``, ``gossip`` or ``module:function`` (called with ``batch``,
    ``seed`` and ``options``); ConfigError when it cannot or when the result lacks the protocol."""
    factory = BUILTIN.get(spec) or import_factory(
        spec, "is none of lsq, logreg, gossip, or module:function returning a vectorized task",
        where="swarmnet simulate")
    task = call_factory(spec, factory, dict(options or {}), flag="--task-option", batch=batch, seed=seed)
    if not isinstance(task, VectorTask):
        raise ConfigError(
            f"task {spec!r} returned {type(task).__name__}, which lacks the simulator protocol "
            "(name, dim, init, draw, grad, metrics, to; see swarmnet.sim.problems)"
        )
    return task
