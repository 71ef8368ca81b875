"""Checkpoints as common trainers write them: Lightning's nested ``state_dict`` with the LightningModule's attribute
prefix, a script's ``{"model": ...}`` or ``{"model_state_dict": ...}``, DDP's ``module.`` and torch.compile's
``_orig_mod.`` prefixes; and the classifier-head mismatch message naming the number of classes."""

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import convlens
from convlens import ConvlensError, UnwrappedCheckpointWarning
from convlens.cli import cli
from convlens.models.checkpoints import load_state_dict, load_weights

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TINY = {"num_classes": 5, "width": 4, "blocks": 3, "input_size": 32}


def tiny(**params):
    return convlens.registry.create("model", "tiny-cnn", **{**TINY, **params})


def logits(module):
    with torch.no_grad():
        return module.eval()(IMAGES)


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN with weights unlike the seed-0 initialisation the plugin builds."""
    return tiny(seed=7).module


def prefixed(module, prefix):
    return {prefix + key: value for key, value in module.state_dict().items()}


def lightning_checkpoint(state):
    """What Lightning's ModelCheckpoint saves: the module's state dict among the trainer's state."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    return {
        "epoch": 4,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 5, "completed": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.31)}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1, "num_classes": 5},
    }


def written(tmp_path, name, content):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(content, str(path))
    else:
        torch.save(content, path)
    return path


CASES = {
    "lightning": ("last.ckpt", lambda m: lightning_checkpoint(prefixed(m, "model.")), "'state_dict'", "model."),
    "script-model": ("run.pt", lambda m: {"model": m.state_dict(), "epoch": 9}, "'model'", None),
    "script-model-state-dict": ("run.pth", lambda m: {"model_state_dict": m.state_dict()}, "'model_state_dict'", None),
    "ddp": ("ddp.safetensors", lambda m: prefixed(m, "module."), None, "module."),
    "compile": ("compiled.pt", lambda m: torch.compile(m).state_dict(), None, "_orig_mod."),
    "data-parallel": ("dp.pth", lambda m: nn.DataParallel(m).state_dict(), None, "module."),
    "ddp-compile-lightning": (
        "both.ckpt",
        lambda m: lightning_checkpoint(prefixed(m, "net.module._orig_mod.")),
        "'state_dict'",
        "net.module._orig_mod.",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_checkpoints_load_with_one_warning_saying_what_was_unwrapped(trained, tmp_path, case):
    name, content, entry, prefix = CASES[case]
    path = written(tmp_path, name, content(trained))
    with pytest.warns(UnwrappedCheckpointWarning) as seen:
        bundle = tiny(weights=str(path))
    assert torch.equal(logits(bundle.module), logits(trained))
    unwrapped = [w for w in seen if issubclass(w.category, UnwrappedCheckpointWarning)]
    assert len(unwrapped) == 1, [str(w.message) for w in seen]  # other libraries' warnings may be recorded too
    message = str(unwrapped[0].message)
    assert message.startswith(f"checkpoint {path} is a training checkpoint: ")
    assert (f"took the weights from its {entry} entry" in message) == (entry is not None)
    assert (f"removed the prefix '{prefix}' from the tensor names" in message) == (prefix is not None)
    assert f"({len(trained.state_dict())} tensors)" in message


def test_tensors_outside_the_prefix_are_named_and_ignored(trained, tmp_path):
    state = {**prefixed(trained, "model."), "criterion.weight": torch.ones(5), "teacher.fc.bias": torch.zeros(5)}
    path = written(tmp_path, "extra.ckpt", lightning_checkpoint(state))
    with pytest.warns(UnwrappedCheckpointWarning, match=r"ignored 2 tensors outside that prefix \(criterion\.weight"):
        bundle = tiny(weights=str(path))
    assert torch.equal(logits(bundle.module), logits(trained))


def test_a_plain_state_dict_loads_without_a_warning(trained, tmp_path, recwarn):
    path = written(tmp_path, "plain.pt", trained.state_dict())
    assert torch.equal(logits(tiny(weights=str(path)).module), logits(trained))
    assert not [w for w in recwarn if issubclass(w.category, UnwrappedCheckpointWarning)]


def test_load_state_dict_returns_the_weights_entry(trained, tmp_path):
    path = written(tmp_path, "run.pt", {"model": trained.state_dict(), "optimizer": {"state": {}, "param_groups": []}})
    state = load_state_dict(path)
    assert state.keys() == trained.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())


def test_two_copies_of_the_model_under_different_prefixes_are_refused(trained, tmp_path):
    path = written(
        tmp_path, "ema.ckpt", lightning_checkpoint({**prefixed(trained, "model."), **prefixed(trained, "ema.")})
    )
    with pytest.raises(ConvlensError, match=r"under several prefixes \('ema\.', 'model\.'\).*save_file"):
        tiny(weights=str(path))


def test_a_mapping_without_weights_is_refused_naming_the_entries_looked_for(tmp_path):
    path = written(tmp_path, "stats.pt", {"epoch": 3, "losses": [0.5, 0.4]})
    with pytest.raises(ConvlensError) as caught:
        load_state_dict(path)
    message = str(caught.value)
    assert "refusing to load" in message and "keys: epoch, losses" in message
    assert "'state_dict', 'model_state_dict', 'model', 'module'" in message


def test_a_prefixed_checkpoint_that_still_does_not_fit_says_how_it_was_read(trained, tmp_path):
    state = {k: v for k, v in prefixed(trained, "module.").items() if not k.startswith("module.block3")}
    path = written(tmp_path, "cut.safetensors", state)
    with pytest.raises(ConvlensError, match=r"\(names without 'module\.'\) does not fit the model \(missing: block3"):
        tiny(weights=str(path))


def test_a_head_of_another_size_names_the_classes_and_the_option(tmp_path):
    path = written(tmp_path, "ten.safetensors", tiny(num_classes=10).module.state_dict())
    with pytest.raises(ConvlensError) as caught:
        tiny(weights=str(path))
    assert str(caught.value) == (
        f"checkpoint {path} does not fit the model: its classifier head 'fc' has 10 classes (fc.weight [10, 16]), "
        "the model's 5; build it with 10 classes: --model-num-classes 10 on the command line (--num-classes 10 "
        "after `convlens train-model MODEL` or `convlens layers MODEL`), params = { num_classes = 10 } under a "
        "recipe's [model], num_classes=10 in Python"
    )
    assert tiny(weights=str(path), num_classes=10).module.fc.out_features == 10


def test_the_head_message_reaches_the_command_line(tmp_path):
    path = written(tmp_path, "ten.ckpt", {"state_dict": prefixed(tiny(num_classes=10).module, "model.")})
    options = ["--width", "4", "--blocks", "3", "--input-size", "32"]
    result = CliRunner().invoke(cli, ["layers", "tiny-cnn", *options, "--weights", str(path)])
    assert result.exit_code != 0
    assert "('state_dict' entry, names without 'model.')" in result.output
    assert "has 10 classes" in result.output and "--num-classes 10" in result.output
    fixed = CliRunner().invoke(cli, ["layers", "tiny-cnn", *options, "--weights", str(path), "--num-classes", "10"])
    assert fixed.exit_code == 0, fixed.output


def test_a_model_without_a_classes_parameter_gets_no_option_to_pass(tmp_path):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 3))
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 7))
    path = written(tmp_path, "seven.safetensors", other.state_dict())
    with pytest.raises(
        ConvlensError,
        match=r"has 7 classes \(2\.weight \[7, 4\]\), the model's 3; build the model with a 7-class head$",
    ):
        load_weights(module, path)


def test_a_mis_shaped_body_is_no_head_mismatch(trained, tmp_path):
    path = written(tmp_path, "wide.safetensors", tiny(width=8).module.state_dict())
    with pytest.raises(
        ConvlensError, match=r"shape mismatch: block1\.0\.weight \[8, 3, 3, 3\] vs \[4, 3, 3, 3\]"
    ) as caught:
        tiny(weights=str(path))
    assert "classifier head" not in str(caught.value)


def test_a_partial_checkpoint_under_a_prefix_loads_what_it_has(trained, tmp_path):
    body = {k: v for k, v in prefixed(trained, "module.").items() if not k.startswith("module.fc.")}
    path = written(tmp_path, "body.safetensors", body)
    module = tiny(seed=0).module
    with pytest.warns(convlens.PartialWeightsWarning, match=r"2 missing, left as initialised: fc\.weight, fc\.bias"):
        with pytest.warns(UnwrappedCheckpointWarning, match=r"removed the prefix 'module\.'"):
            load_weights(module, path, partial=True)
    assert torch.equal(module.block1[0].weight, trained.block1[0].weight)
    assert not torch.equal(module.fc.weight, trained.fc.weight)


def test_a_fine_tuned_efficientnet_checkpoint_reloads_with_its_number_of_classes(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    tuned = convlens.registry.create("model", "efficientnet-lite0", weights="none", num_classes=10, seed=2).module
    path = written(tmp_path, "tuned.safetensors", tuned.state_dict())
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    again = convlens.registry.create("model", "efficientnet-lite0", weights=str(path), num_classes=10).module
    with torch.no_grad():
        assert torch.equal(again.eval()(images), tuned.eval()(images))
    with pytest.raises(ConvlensError, match=r"'_fc' has 10 classes \(_fc\.weight \[10, 1280\]\), the model's 1000"):
        convlens.registry.create("model", "efficientnet-lite0", weights=str(path))
