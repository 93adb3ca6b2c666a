import pytest


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct, loaded once per test session (from the safetensors cache)."""
    from ankus import load_model

    return load_model()


def pytest_addoption(parser):
    parser.addoption("--harness", action="store_true",
                     help="also run the lm-evaluation-harness adapter tests (tests/harness; needs pip install 'ankus[evals]')")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``harness`` run only with ``--harness``; otherwise they are deselected (and
    counted in the summary as deselected, not skipped)."""
    if config.getoption("--harness"):
        return
    dropped = [item for item in items if "harness" in item.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if "harness" not in item.keywords]
