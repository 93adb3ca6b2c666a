"""ankus: align, steer and audit language models."""

from ankus.models.loading import DEFAULT_MODEL, ModelLoadError, load_model

__all__ = ["DEFAULT_MODEL", "ModelLoadError", "load_model", "train"]
__version__ = "0.1.0"


def train(recipe, reward_fn=None, overrides=None, **kwargs):
    """Run a recipe from Python, exactly as ``ankus train`` does. See :func:`ankus.recipes.run_recipe`."""
    from ankus.recipes import run_recipe

    if reward_fn is not None:  # only the PPO trainer takes one
        kwargs["reward_fn"] = reward_fn
    return run_recipe(recipe, overrides=overrides or {}, **kwargs)
