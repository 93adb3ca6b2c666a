"""Five ways to find a sentiment direction in the residual stream (Tigges et al. 2023).

From activations X (N, D) and labels y (N,) in {0, 1}, each a unit (D,) vector oriented so that
positive examples project higher:

* ``mean_diff``: mean(positive) - mean(negative);
* ``kmeans``: the difference of the two k-means centroids (scikit-learn, labels unused but for the sign);
* ``pca``: the first principal component;
* ``logistic``: the weight vector of a logistic-regression probe (scikit-learn);
* ``das``: distributed alignment search, a learned direction trained so that an interchange
  intervention along it (:func:`~ankus.audits.interventions.patch_along`: the base takes the
  source's coordinate) makes the model's label logit difference follow the source's label. A small
  torch optimisation over the direction only; the model is frozen.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ankus.audits.interventions import patch_along
from ankus.audits.sentiment_data import EmptyDataError
from ankus.data.tokens import position_ids_from_mask
from ankus.generation.hooks import edit_residual

__all__ = ["METHODS", "EmptyActivationsError", "find_direction", "mean_diff", "kmeans_direction",
           "pca_direction", "logistic_direction", "das_direction", "orient", "probe_accuracy", "interchange_accuracy"]

METHODS = ("mean_diff", "kmeans", "pca", "logistic", "das")


class EmptyActivationsError(EmptyDataError):
    """No activations, or only one class: no direction can be found from them."""


def _check(X: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    if X.ndim != 2 or X.shape[0] == 0:
        raise EmptyActivationsError(f"no activations to find a direction from (got shape {tuple(X.shape)}); "
                                    "check the data set and the layer")
    y = y.long()
    if X.shape[0] != y.shape[0]:
        raise EmptyActivationsError(f"{X.shape[0]} activations but {y.shape[0]} labels")
    if int(y.sum()) in (0, len(y)):
        raise EmptyActivationsError("the activations hold one class only; a direction needs positive and negative "
                                    "examples")
    return X.double().cpu().numpy(), y.cpu().numpy()


def _orient(d: np.ndarray, X: np.ndarray, y: np.ndarray) -> Tensor:
    """(D,) unit vector, sign chosen so the positive class projects higher on average."""
    d = d / max(np.linalg.norm(d), 1e-12)
    if (X[y == 1] @ d).mean() < (X[y == 0] @ d).mean():
        d = -d
    return torch.from_numpy(d).float()


def mean_diff(X: Tensor, y: Tensor) -> Tensor:
    Xn, yn = _check(X, y)
    return _orient(Xn[yn == 1].mean(0) - Xn[yn == 0].mean(0), Xn, yn)


def kmeans_direction(X: Tensor, y: Tensor, seed: int = 0) -> Tensor:
    from sklearn.cluster import KMeans

    Xn, yn = _check(X, y)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(Xn)
    return _orient(km.cluster_centers_[1] - km.cluster_centers_[0], Xn, yn)


def pca_direction(X: Tensor, y: Tensor) -> Tensor:
    from sklearn.decomposition import PCA

    Xn, yn = _check(X, y)
    return _orient(PCA(n_components=1).fit(Xn).components_[0], Xn, yn)


def logistic_direction(X: Tensor, y: Tensor, seed: int = 0) -> Tensor:
    from sklearn.linear_model import LogisticRegression

    Xn, yn = _check(X, y)
    scale = Xn.std(0).mean() + 1e-12  # one scalar: the probe's direction is unchanged, the solver converges
    clf = LogisticRegression(max_iter=5000, random_state=seed).fit(Xn / scale, yn)
    return _orient(clf.coef_[0], Xn, yn)


def find_direction(method: str, X: Tensor, y: Tensor, seed: int = 0) -> Tensor:
    """One of the activation-only methods by name (DAS needs the model: :func:`das_direction`)."""
    if method == "mean_diff":
        return mean_diff(X, y)
    if method == "kmeans":
        return kmeans_direction(X, y, seed)
    if method == "pca":
        return pca_direction(X, y)
    if method == "logistic":
        return logistic_direction(X, y, seed)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def probe_accuracy(d: Tensor, X_train: Tensor, y_train: Tensor, X: Tensor, y: Tensor) -> float:
    """Accuracy of the direction as a classifier: projection above the midpoint of the two training
    class means = positive."""
    p_train = X_train.float() @ d
    y_train = y_train.bool()
    threshold = 0.5 * (p_train[y_train].mean() + p_train[~y_train].mean())
    return float(((X.float() @ d > threshold) == y.bool()).float().mean())


def _pairs(labels: Sequence[int], groups: Sequence[int], rng: random.Random, n: int) -> list[tuple[int, int]]:
    """n (base, source) index pairs of the same group (template) and opposite labels."""
    by = {}
    for i, (lab, g) in enumerate(zip(labels, groups)):
        by.setdefault((g, lab), []).append(i)
    keys = [(g, lab) for (g, lab) in by if (g, 1 - lab) in by]
    if not keys:
        raise EmptyActivationsError("no (base, source) pairs of opposite labels in the same template")
    out = []
    for _ in range(n):
        g, lab = rng.choice(keys)
        out.append((rng.choice(by[(g, lab)]), rng.choice(by[(g, 1 - lab)])))
    return out


def _stack(rows: list[Tensor], idx: list[int]) -> Tensor:
    return torch.stack([rows[i] for i in idx])


def _patched_logit_diff(model, ids: Tensor, src_h: Tensor, layer: int, d: Tensor, label_ids: tuple[int, int]
                        ) -> Tensor:
    """(b, T) base ids, (b, T, D) source residual at ``layer`` -> (b,) label logit difference of the
    base with its coordinate along d patched from the source at every position."""
    mask = torch.ones_like(ids)
    with edit_residual(model, layer, lambda h: patch_along(h, src_h.to(h.dtype), d.to(h.dtype))):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       logits_to_keep=1).logits[:, -1].float()
    return logits[:, label_ids[0]] - logits[:, label_ids[1]]


def das_direction(model, ids: list[Tensor], resid: list[Tensor], labels: Sequence[int], groups: Sequence[int], layer: int,
                  label_ids: tuple[int, int], steps: int = 40, lr: float = 0.01, batch: int = 16, seed: int = 0,
                  init: Tensor | None = None) -> tuple[Tensor, list[float]]:
    """DAS: a unit (D,) direction trained so that patching its coordinate from a source sentence
    into a base sentence (same template, opposite label) makes the label logit difference follow
    the source (binary cross-entropy on the logit difference). ``ids``: N unpadded sentences (T,),
    of equal length within a group; ``resid``: their residual streams (T, D) at ``layer``. Returns the
    direction (unit, sign arbitrary: :func:`orient`) and the loss per step."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    D = resid[0].shape[-1]
    w = init.clone().float() if init is not None else torch.randn(D, generator=gen)
    w = (w / w.norm()).requires_grad_(True)  # unit start: lr is a step size on the sphere's scale
    opt = torch.optim.Adam([w], lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses = []
    try:
        for _ in range(steps):
            pairs = _pairs(labels, groups, rng, batch)
            by_group: dict[int, list[tuple[int, int]]] = {}
            for b, s in pairs:
                by_group.setdefault(groups[b], []).append((b, s))
            opt.zero_grad()
            total = 0.0
            for group_pairs in by_group.values():  # equal lengths within a template
                b_idx = [b for b, _ in group_pairs]
                s_idx = [s for _, s in group_pairs]
                d = w / w.norm()
                ld = _patched_logit_diff(model, _stack(ids, b_idx), _stack(resid, s_idx), layer, d, label_ids)
                target = torch.tensor([float(labels[s]) for s in s_idx])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(ld, target, reduction="sum") / batch
                loss.backward()
                total += float(loss.detach())
            opt.step()
            losses.append(total)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return (w / w.norm()).detach(), losses


def orient(d: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """(D,) unit d, its sign chosen so that positive rows of X (N, D) project higher on average."""
    Xn, yn = _check(X, y)
    return _orient(d.double().cpu().numpy(), Xn, yn)


@torch.no_grad()
def interchange_accuracy(model, ids: list[Tensor], resid: list[Tensor], labels: Sequence[int], groups: Sequence[int],
                         layer: int, d: Tensor, label_ids: tuple[int, int], n_pairs: int = 64, seed: int = 1
                         ) -> float:
    """Share of (base, source) pairs whose patched logit difference has the source's sign."""
    pairs = _pairs(labels, groups, random.Random(seed), n_pairs)
    hits = 0
    for g in sorted({groups[b] for b, _ in pairs}):
        b_idx = [b for b, _ in pairs if groups[b] == g]
        s_idx = [s for b, s in pairs if groups[b] == g]
        ld = _patched_logit_diff(model, _stack(ids, b_idx), _stack(resid, s_idx), layer, d, label_ids)
        hits += int(((ld > 0) == torch.tensor([bool(labels[s]) for s in s_idx])).sum())
    return hits / len(pairs)
