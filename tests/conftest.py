import pytest

pytest_plugins = ["convlens.testing"]


@pytest.fixture(autouse=True)
def _plugin_env(monkeypatch):
    """Tests start from default plugin settings, whatever the calling shell exported."""
    for name in ("CONVLENS_STRICT_PLUGINS", "CONVLENS_LOAD_PLUGINS", "CONVLENS_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def renders(monkeypatch):
    """Every call of the feature-visualisation renderer: its objectives and settings (the render still runs)."""
    from convlens.plugins.visualizers.feature_viz import render as feature_viz_render

    calls = []
    real = feature_viz_render.render

    def recording(module, layer, objectives, settings, **options):
        calls.append({"objectives": list(objectives), "settings": settings, "sae": options.get("sae")})
        return real(module, layer, objectives, settings, **options)

    monkeypatch.setattr(feature_viz_render, "render", recording)
    return calls
