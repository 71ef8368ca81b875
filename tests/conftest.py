import pytest

pytest_plugins = ["convlens.testing"]


@pytest.fixture(autouse=True)
def _plugin_env(monkeypatch):
    """Tests start from default plugin settings, whatever the calling shell exported."""
    for name in ("CONVLENS_STRICT_PLUGINS", "CONVLENS_LOAD_PLUGINS", "CONVLENS_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
