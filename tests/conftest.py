import os

import pytest

pytest_plugins = ["convlens.testing"]


def pytest_configure(config):
    """Under pytest-xdist each worker gets an equal share of the cores (torch threads, and through the environment
    the threads of the subprocesses it starts): oversubscribed OpenMP threads spin and slow everything down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The tests marked slow first (stable otherwise), so that parallel workers finish together; tests marked cuda
    skip where no GPU is present, each named in the summary."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if any(item.get_closest_marker("cuda") for item in items):
        import torch

        if not torch.cuda.is_available():
            for item in items:
                if item.get_closest_marker("cuda"):
                    item.add_marker(pytest.mark.skip(reason=f"{item.name} needs a CUDA GPU"))  # listed one by one


@pytest.fixture(autouse=True)
def _plugin_env(monkeypatch):
    """Tests start from default plugin settings, whatever the calling shell exported."""
    for name in (
        "CONVLENS_STRICT_PLUGINS",
        "CONVLENS_LOAD_PLUGINS",
        "CONVLENS_DISABLE_PLUGINS",
        "CONVLENS_PLUGIN_BUDGET",
    ):
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


@pytest.fixture(scope="module")
def small_trained_model(tmp_path_factory):
    """tiny-cnn (width 8, 4 blocks) trained for 3 epochs on 240 shapes images of 32 px (a few seconds): ``.model``,
    its run folder, and ``.data``, the images."""
    from types import SimpleNamespace

    from helpers import train_tiny_cnn

    root = train_tiny_cnn(tmp_path_factory.mktemp("small-trained"), "model", images=240, size=32, epochs=3)
    return SimpleNamespace(model=root / "model", data=root / "shapes")


@pytest.fixture(scope="session")
def efficientnet_lite0():
    """The ImageNet EfficientNet-Lite0 bundle through the registry (the `real` extra), shared by the tests."""
    pytest.importorskip("efficientnet_lite_pytorch", reason='efficientnet-lite0 needs pip install -e ".[real]"')
    import convlens

    return convlens.registry.create("model", "efficientnet-lite0")


@pytest.fixture(scope="session")
def imagenet_photos():
    """foolbox's 20 labelled ImageNet validation photos: (paths, class indices from the file names)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        pytest.skip('the labelled ImageNet photos come with foolbox: pip install -e ".[real]"')
    paths = sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))
    return paths, [int(path.stem.rsplit("_", 1)[1]) for path in paths]


@pytest.fixture(scope="session")
def imagenet_batch(efficientnet_lite0, imagenet_photos):
    """The 20 photos as efficientnet-lite0's eval inputs [20, 3, 224, 224], and their labels."""
    import torch

    import convlens

    bundle = efficientnet_lite0
    preprocessing = convlens.Preprocessing(bundle.input_size, bundle.mean, bundle.std, bundle.crop_fraction)
    paths, labels = imagenet_photos
    return torch.stack([preprocessing.eval_transform(convlens.open_rgb(path)) for path in paths]), labels
