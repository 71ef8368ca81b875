"""The README tells the truth: hook reference, install and test commands, CI script."""

import inspect
import re

from convlens.core import hookspecs
from helpers import ROOT, readme_section


def hookspec_functions():
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if callable(fn) and hasattr(fn, hookspecs.PROJECT_NAME + "_spec")
    }


def test_every_hookspec_is_documented_with_its_signature():
    reference = readme_section("Writing a plugin")
    specs = hookspec_functions()
    assert set(specs) == {
        "register_models",
        "register_filters",
        "register_saes",
        "register_visualizers",
        "register_metrics",
        "register_commands",
    }
    for name, fn in specs.items():
        signature = f"{name}({', '.join(inspect.signature(fn).parameters)})"
        assert f"- `{signature}`:" in reference, f"README hook reference lacks `{signature}`"
        assert fn.__doc__ and "Contract" in fn.__doc__ or name == "register_commands"
    documented = set(re.findall(r"- `(register_\w+)\(", reference))
    assert documented == set(specs)


def test_ci_runs_the_readme_install_and_test_commands():
    install = re.search(r"## Install.*?```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)[1]
    test = readme_section("Test").split("```bash\n")[1].split("\n```")[0]
    ci = " ".join((ROOT / ".ci" / "run").read_text().replace("\\\n", " ").split())  # whitespace-insensitive
    pip_command = " ".join(install.replace("\\\n", " ").split("&&")[-1].split())
    assert pip_command in ci and test.strip() in ci
