"""``ankus audit moments image``: a digits classifier across training on samples that keep only a
class's low-order statistics (Belrose et al. 2024, "Neural networks learn statistics of increasing order").

Data: scikit-learn's bundled ``digits`` (1,797 8x8 images, pixels 0..16 scaled to [0, 1]), a
seeded stratified split. A small MLP or CNN (torch) trains with Adam; at log-spaced checkpoints it
is scored on

* ``acc_test``: held-out real digits;
* ``acc_maxent``: samples of the maximum-entropy density on [0, 1]^64 with each class's pixel means
  (independent truncated exponentials, :func:`moments_math.sample_maxent_box`), labelled by that class;
* ``acc_gauss``: samples of N(class mean, class covariance + ridge I) (the maximum-entropy
  density with those two moments), labelled by that class;
* ``ot_target``: held-out images of class s moved by the Gaussian optimal-transport map from class
  s's statistics to class t's (every s != t): how often the net says t, and ``ot_source`` how
  often it still says s.

The reference effect: early in training a network relies on low-order statistics, so it classifies
the synthetic samples well and calls OT-edited images the target class; later its accuracy on them
falls as it uses higher-order structure. Outputs in ``--out``: ``table.csv``, ``rows.jsonl``,
``moments_image.png`` (x = step), ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ankus.audits import moments_math as mm
from ankus.audits.tables import save_figure, step_axes, write_rows
from ankus.config import ConfigError

__all__ = ["MomentsImageConfig", "load_digits_split", "make_net", "checkpoint_steps", "synthetic_sets",
           "score", "run_moments_image", "plot_image", "cmd_moments_image"]

COLUMNS = ["step", "acc_test", "acc_maxent", "acc_gauss", "ot_target", "ot_source"]


@dataclass
class MomentsImageConfig:
    out: str = ""
    """Directory for table.csv, rows.jsonl and moments_image.png."""
    arch: Literal["mlp", "cnn"] = "mlp"
    """mlp: 64-hidden-hidden-10 ReLU; cnn: two 3x3 convolutions and a linear head."""
    hidden: int = 128
    """MLP width / CNN channels x 4."""
    steps: int = 2000
    """Adam steps."""
    batch_size: int = 64
    lr: float = 1e-3
    checkpoints: int = 12
    """Checkpoints, log-spaced from step 0 (the initialization) to ``steps``."""
    samples: int = 200
    """Max-entropy and Gaussian samples per class."""
    ridge: float = 1e-3
    """Added to each class covariance (constant border pixels make it singular)."""
    test_fraction: float = 0.25
    seed: int = 0


def load_digits_split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train (N, 64) in [0, 1], y_train (N,), x_test, y_test)``: sklearn's digits, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.data.astype(np.float64) / 16.0
    return tuple(train_test_split(x, d.target, test_size=test_fraction, random_state=seed, stratify=d.target))


def make_net(arch: str, hidden: int) -> torch.nn.Module:
    """A classifier of ``(B, 64)`` pixel vectors into 10 logits."""
    nn = torch.nn
    if arch == "mlp":
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    if arch == "cnn":
        c = max(hidden // 4, 4)
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(2 * c * 16, 10))
    raise ConfigError(f"moments image: arch must be mlp or cnn, got {arch!r}")


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """``n`` (or fewer, deduplicated) steps: 0, then log-spaced from 1 to ``steps``."""
    if steps < 1 or n < 2:
        raise ConfigError(f"moments image: need --steps >= 1 and --checkpoints >= 2, got {steps} and {n}")
    return sorted({0, *np.unique(np.round(np.geomspace(1, steps, n - 1)).astype(int)).tolist()})


def synthetic_sets(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   cfg: MomentsImageConfig) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{name: (x (M, 64), label (M,), source class (M,))}`` for maxent, gauss and ot (label = the target t)."""
    rng = np.random.default_rng(cfg.seed)
    classes = np.unique(y_train)
    stats = {c: mm.gaussian_fit(x_train[y_train == c], cfg.ridge) for c in classes}
    sets: dict[str, list] = {"maxent": [], "gauss": [], "ot": []}
    for c in classes:
        mean, cov = stats[c]
        lab = np.full(cfg.samples, c)
        sets["maxent"].append((mm.sample_maxent_box(mean, cfg.samples, rng), lab, lab))
        sets["gauss"].append((mm.sample_gaussian(mean, cov, cfg.samples, rng), lab, lab))
        for t in classes[classes != c]:
            a, b = mm.gaussian_ot_map(mean, cov, *stats[t])
            src = x_test[y_test == c]
            sets["ot"].append((mm.apply_map(src, a, b), np.full(len(src), t), np.full(len(src), c)))
    return {k: tuple(np.concatenate(parts) for parts in zip(*v)) for k, v in sets.items()}


@torch.no_grad()
def score(net: torch.nn.Module, x_test: np.ndarray, y_test: np.ndarray, sets: dict) -> dict[str, float]:
    """The table's columns but step, for the network as it is."""
    def predict(x: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(x).float()).argmax(-1).numpy()

    pred_ot = predict(sets["ot"][0])
    return {"acc_test": float((predict(x_test) == y_test).mean()),
            "acc_maxent": float((predict(sets["maxent"][0]) == sets["maxent"][1]).mean()),
            "acc_gauss": float((predict(sets["gauss"][0]) == sets["gauss"][1]).mean()),
            "ot_target": float((pred_ot == sets["ot"][1]).mean()), "ot_source": float((pred_ot == sets["ot"][2]).mean())}


def run_moments_image(cfg: MomentsImageConfig) -> list[dict]:
    """Train, score at every checkpoint; write table.csv, rows.jsonl, moments_image.png and config.yaml."""
    if not cfg.out:
        raise ConfigError("moments image: give --out DIR for the table and the plot")
    x_train, x_test, y_train, y_test = load_digits_split(cfg.test_fraction, cfg.seed)
    sets = synthetic_sets(x_train, y_train, x_test, y_test, cfg)
    marks = checkpoint_steps(cfg.steps, cfg.checkpoints)
    torch.manual_seed(cfg.seed)
    net = make_net(cfg.arch, cfg.hidden)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    xt, yt = torch.from_numpy(x_train).float(), torch.from_numpy(y_train).long()
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = [{"step": 0, **score(net.eval(), x_test, y_test, sets)}]
    for step in range(1, cfg.steps + 1):
        net.train()
        ix = torch.randint(len(xt), (cfg.batch_size,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(xt[ix]), yt[ix])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in marks:
            rows.append({"step": step, **score(net.eval(), x_test, y_test, sets)})
            print("[moments image] " + "  ".join(f"{k}={v:.4g}" for k, v in rows[-1].items()), flush=True)
    out = write_rows(cfg.out, cfg, rows, COLUMNS, decimals=4)
    plot_image(rows, out / "moments_image.png", cfg.arch)
    return rows


def plot_image(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Every column against step (symlog x), chance (0.1) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = [r["step"] for r in rows]
    for key in COLUMNS[1:]:
        ax.plot(steps, [r[key] for r in rows], marker="o", markersize=3, label=key)
    ax.axhline(0.1, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_ylabel("fraction")
    ax.set_title(f"digits {title}: real, max-entropy, Gaussian and OT-edited samples")
    step_axes(ax, linthresh=1)
    return save_figure(fig, path)


def cmd_moments_image(args) -> int:
    cfg = MomentsImageConfig(**{k: getattr(args, k) for k in asdict(MomentsImageConfig()) if hasattr(args, k)})
    run_moments_image(cfg)
    print(f"[moments image] wrote {Path(cfg.out) / 'table.csv'} and moments_image.png")
    return 0
