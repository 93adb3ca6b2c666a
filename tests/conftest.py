import pytest


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct, loaded once per test session (from the safetensors cache)."""
    from ankus import load_model

    return load_model()

