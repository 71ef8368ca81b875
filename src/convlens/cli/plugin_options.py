"""Options shared by commands that take a model (plugin name or run folder) and filters with their own options."""

from __future__ import annotations

from typing import Any

import click

from convlens.core.component_registry import default_registry
from convlens.core.errors import ConvlensError
from convlens.core.params import click_parameters, parameter_specs, values_from_click
from convlens.models.loading import load_model as load_model_with
from convlens.models.loading import resolve_model_argument

MODEL_PREFIX, FILTER_PREFIX, SAE_PREFIX = "model__", "filter__", "sae__"


def _peek(args: list[str], option: str) -> str | None:
    for position, arg in enumerate(args):
        if arg == option and position + 1 < len(args):
            return args[position + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


class PluginOptionsCommand(click.Command):
    """A command whose ``--model NAME``, ``--filter NAME`` and ``--sae NAME`` add that plugin's own options when
    parsing (an SAE's ``input_dim`` is left out: it comes from the activations). ``plugin_flags`` says which of
    the three the command takes as plugin names."""

    plugin_flags: tuple[str, ...] = ("--model", "--filter", "--sae")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        self.params = [
            p for p in self.params if not (p.name or "").startswith((MODEL_PREFIX, FILTER_PREFIX, SAE_PREFIX))
        ]
        reserved = {opt.lstrip("-") for p in self.params for opt in getattr(p, "opts", [])}
        try:
            model = _peek(args, "--model") if "--model" in self.plugin_flags else None
            if model:
                name, _ = resolve_model_argument(model, trust_code=True)  # only its name; load_model checks trust
                spec = default_registry().get("model", name).spec.params
                every = {s.name.replace("_", "-") for s in parameter_specs(spec)}
                self.params += click_parameters(
                    spec, reserved=every | reserved, prefix="model", dest_prefix=MODEL_PREFIX
                )
            filter_name = _peek(args, "--filter") if "--filter" in self.plugin_flags else None
            if filter_name:
                spec = default_registry().get("filter", filter_name).spec.params
                self.params += click_parameters(spec, reserved=reserved, prefix="filter", dest_prefix=FILTER_PREFIX)
            sae_name = _peek(args, "--sae") if "--sae" in self.plugin_flags else None
            if sae_name:
                spec = default_registry().get("sae", sae_name).spec.params
                self.params += [
                    option
                    for option in click_parameters(spec, reserved=reserved, prefix="sae", dest_prefix=SAE_PREFIX)
                    if option.name != f"{SAE_PREFIX}input_dim"
                ]
        except ConvlensError as exc:
            raise click.UsageError(str(exc), ctx) from exc
        return super().parse_args(ctx, args)


def load_model(model_argument: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The model bundle for ``--model`` and its ``--model-*`` options, and the record runs keep of it."""
    return load_model_with(model_argument, values_from_click(options, MODEL_PREFIX))


class ModelOptionsCommand(PluginOptionsCommand):
    """Only ``--model`` names a plugin (e.g. ``--sae`` is a checkpoint path)."""

    plugin_flags = ("--model",)
