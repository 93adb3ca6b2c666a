"""Reward functions and their checks.

Protocol (trlX's): ``reward_fn(samples, prompts, outputs, **metadata)`` returns one float per
sample, or one list of floats per sample for dense (per-token) rewards. ``samples[i]`` is
``prompts[i] + outputs[i]`` as decoded text.

    reward_fn = get_reward_fn("sentiment")                       # built-in
    reward_fn = get_reward_fn("randomwalks", seed=1000)          # built-in factory with options
    reward_fn = get_reward_fn("my_pkg.scoring:length_reward")    # any importable callable
    scores = check_rewards(reward_fn(samples=s, prompts=p, outputs=o), n=len(s), batch_index=3)
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["RewardConfig", "RewardError", "REWARD_FNS", "get_reward_fn", "check_rewards"]


@dataclass
class RewardConfig:
    name: str = "sentiment"
    """Built-in reward (sentiment, randomwalks) or 'module:function'."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for the reward factory."""
    on_main: bool = False
    """Several processes: score every process's samples on the main one and send the scores back
    (trlX's way: one reward model in memory); false = each process scores its own samples."""


RewardFn = Callable[..., Any]


class RewardError(ValueError):
    """A reward function that cannot be found, or that returned something unusable."""


def _sentiment(**kwargs) -> RewardFn:
    if kwargs:
        raise RewardError(f"reward 'sentiment' takes no options, got {sorted(kwargs)}")
    from ankus.rewards.sentiment import sentiment_reward

    return sentiment_reward


def _randomwalks(**kwargs) -> RewardFn:
    from ankus.rewards.randomwalks import generate_random_walks

    return generate_random_walks(**kwargs).reward_fn


# Built-in name -> factory(**options) -> reward_fn. Factories import lazily.
REWARD_FNS: dict[str, Callable[..., RewardFn]] = {
    "sentiment": _sentiment,
    "randomwalks": _randomwalks,
}


def get_reward_fn(name_or_path: str, **kwargs) -> RewardFn:
    """Resolve a reward function.

    * A built-in name (``sentiment``, ``randomwalks``): ``kwargs`` go to its factory.
    * ``"model:<run dir>"``: a reward model trained by ``algorithm: reward_model``.
    * ``"package.module:function"``: the callable is imported; ``kwargs``, if any, are bound
      with :func:`functools.partial` (so they reach the function as keyword arguments).
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise RewardError(f"reward: expected a name or 'module:function', got {name_or_path!r}")
    if name_or_path in REWARD_FNS:
        return REWARD_FNS[name_or_path](**kwargs)
    if name_or_path.startswith("model:"):  # before 'module:function', which it would look like
        from ankus.rewards.model import reward_model_fn

        return reward_model_fn(name_or_path[len("model:"):], **kwargs)
    if ":" not in name_or_path:
        raise RewardError(f"unknown reward '{name_or_path}': built-ins are {sorted(REWARD_FNS)}; "
                          "or give an importable 'package.module:function'")
    module_name, _, attr = name_or_path.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward '{name_or_path}': expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise RewardError(f"reward '{name_or_path}': cannot import module '{module_name}' ({e})") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward '{name_or_path}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward '{name_or_path}': '{attr}' is a {type(obj).__name__}, not callable")
    return functools.partial(obj, **kwargs) if kwargs else obj


def _as_float(value: Any, batch_index: int, index: int, where: str = "") -> float:
    # bool is a numbers.Real in Python, but a True/False "reward" is almost always a bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(f"reward batch {batch_index}, index {index}{where}: expected a float, "
                          f"got {type(value).__name__} {value!r}")
    f = float(value)
    if not math.isfinite(f):
        raise RewardError(f"reward batch {batch_index}, index {index}{where}: value {f} is not finite")
    return f


def check_rewards(scores: Any, n: int, batch_index: int) -> list[float] | list[list[float]]:
    """Validate what a reward function returned for a batch of ``n`` samples.

    Accepts a list/tuple (or anything with ``.tolist()``, e.g. a numpy array or torch tensor)
    of ``n`` finite floats, or of ``n`` lists of finite floats (dense rewards; all items must
    then be lists). Returns it as plain Python floats. Raises :class:`RewardError` naming the
    batch, the index and the bad value.
    """
    if hasattr(scores, "tolist") and not isinstance(scores, (list, tuple)):
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise RewardError(f"reward batch {batch_index}: expected a list of {n} scores, "
                          f"got {type(scores).__name__} {scores!r}"[:300])
    if len(scores) != n:
        raise RewardError(f"reward batch {batch_index}: expected {n} scores (one per sample), got {len(scores)}")
    if not scores:
        return []
    dense = isinstance(scores[0], (list, tuple))
    out: list = []
    for i, s in enumerate(scores):
        if hasattr(s, "tolist") and not isinstance(s, (list, tuple)):
            s = s.tolist()
        if dense != isinstance(s, (list, tuple)):
            kind = "a list of floats (index 0 is one)" if dense else "a float (index 0 is one)"
            raise RewardError(f"reward batch {batch_index}, index {i}: expected {kind}, "
                              f"got {type(s).__name__} {s!r}"[:300])
        if dense:
            out.append([_as_float(v, batch_index, i, f", token {t}") for t, v in enumerate(s)])
        else:
            out.append(_as_float(s, batch_index, i))
    return out
