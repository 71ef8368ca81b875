"""convlens.testing.check_component on every kind, with small plugins written here."""

import json
from dataclasses import dataclass

import pytest
import torch
from PIL import Image
from torch import nn

import convlens
from convlens import ContractError, ModelBundle, ModelSpec, Params, SAESpec, VisualizerSpec, hookimpl, param
from convlens.sae.base import SAEOutput, SparseAutoencoder
from convlens.testing import check_component


@dataclass(frozen=True)
class TinySAEParams(Params):
    input_dim: int = param(6, min=1)
    latent_dim: int = param(12, min=1)
    l1: float = param(1e-3, min=0.0)


class TinySAE(SparseAutoencoder):
    def __init__(self, params):
        super().__init__(params.input_dim, params.latent_dim)
        self.l1 = params.l1
        self.encoder = nn.Linear(params.input_dim, params.latent_dim)
        self.decoder = nn.Linear(params.latent_dim, params.input_dim)

    def encode_vectors(self, x):
        return torch.relu(self.encoder(x))

    def decode_vectors(self, latents):
        return self.decoder(latents)

    def loss_terms(self, x, reconstruction, latents):
        return {"mse": (reconstruction - x).pow(2).mean(), "l1": self.l1 * latents.abs().sum(-1).mean()}


def tiny_model(params):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return ModelBundle(module.eval(), (16, 16), (0.5,) * 3, (0.2,) * 3, default_layer="0")


class MeanMapVisualizer(convlens.Visualizer):
    def run(self, target, out_dir):
        images = torch.rand(1, 3, *target.model.input_size)
        captured = {}
        layer = dict(target.model.module.named_modules())[target.layer]
        handle = layer.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
        try:
            target.model.module(images)
        finally:
            handle.remove()
        record = {"layer": target.layer, "units": []}
        for unit in target.units:
            amap = captured["a"][0, unit].detach()
            amap = (amap - amap.min()) / (amap.max() - amap.min() + 1e-12)
            Image.fromarray((amap.numpy() * 255).astype("uint8")).save(out_dir / f"unit{unit}.png")
            record["units"].append({"unit": unit, "png": f"unit{unit}.png"})
        (out_dir / "record.json").write_text(json.dumps(record))
        return record


class KindsPlugin:
    @hookimpl
    def register_models(self, register):
        register(ModelSpec(name="tiny", factory=tiny_model))
        register(
            ModelSpec(
                name="wrong-layer",
                factory=lambda p: ModelBundle(
                    tiny_model(p).module, (16, 16), (0.5,) * 3, (0.2,) * 3, default_layer="layer9"
                ),
            )
        )

    @hookimpl
    def register_saes(self, register):
        register(SAESpec(name="tiny-relu", factory=TinySAE, params=TinySAEParams))

    @hookimpl
    def register_visualizers(self, register):
        register(VisualizerSpec(name="mean-map", factory=MeanMapVisualizer))


@pytest.fixture
def kinds(register_plugin):
    return register_plugin(KindsPlugin())


def test_good_components_pass(kinds):
    check_component("model", "tiny")
    sae = check_component("sae", "tiny-relu", latent_dim=20)
    assert sae.latent_dim == 20
    check_component("visualizer", "mean-map")
    assert kinds.plugins()[-1].counts == {"model": 2, "filter": 0, "sae": 1, "visualizer": 1, "metric": 0}


def test_broken_model_is_named(kinds):
    with pytest.raises(ContractError, match="default layer 'layer9' is not a named module"):
        check_component("model", "wrong-layer")


def test_sae_base_applies_along_the_channel_axis(kinds):
    sae = convlens.registry.create("sae", "tiny-relu")
    maps = torch.randn(2, 6, 3, 4)
    out = sae(maps)
    assert isinstance(out, SAEOutput)
    rows = maps.permute(0, 2, 3, 1).reshape(-1, 6)
    expected = sae.decode_vectors(sae.encode_vectors(rows)).reshape(2, 3, 4, 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.reconstruction, expected)
    torch.testing.assert_close(sae.decode(sae.encode(maps)), expected)
    torch.testing.assert_close(sae(rows).reconstruction, expected.permute(0, 2, 3, 1).reshape(-1, 6))
    with pytest.raises(ContractError, match="expects 6 features on axis 1, got shape \\(2, 5, 3, 4\\)"):
        sae(torch.randn(2, 5, 3, 4))
