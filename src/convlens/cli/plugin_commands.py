"""``convlens plugins / list / info / install / uninstall``."""

from __future__ import annotations

import json
import subprocess
import sys

import click

from convlens.core.component_registry import KINDS, default_registry
from convlens.core.errors import ConvlensError
from convlens.core.loader import BUDGET_ENV, canonical_dist, installed_plugin_dists, plugin_budget

from .output import echo_json, echo_table

_KIND_COLUMNS = {
    "model": "MODELS",
    "filter": "FILTERS",
    "sae": "SAES",
    "visualizer": "VISUALIZERS",
    "metric": "METRICS",
}


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Include the built-in plugins of convlens itself.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@click.option("--requirements", is_flag=True, help="Show each distribution's requirements.")
def plugins(show_all: bool, as_json: bool, requirements: bool) -> None:
    """List plugin distributions: version, status (ok/slow/error/disabled) and components per kind."""
    infos = [i for i in default_registry().plugins() if show_all or not i.builtin]
    if as_json:
        echo_json([i.to_dict() for i in infos])
        return
    if not infos:
        click.echo("no third-party plugins installed (--all includes the built-ins)")
        return
    headers = ["DIST", "VERSION", "STATUS", *(_KIND_COLUMNS[k] for k in KINDS)]
    if requirements:
        headers.append("REQUIREMENTS")
    rows = []
    for info in infos:
        row = [info.dist, info.version, info.status, *(info.counts.get(k, 0) for k in KINDS)]
        if requirements:
            row.append(", ".join(info.requirements) or "-")
        rows.append(row)
    echo_table(headers, rows)
    failed = [i for i in infos if i.status == "error"]
    if failed:
        click.echo("\nerrors:")
        for info in failed:
            for error in info.errors:
                click.echo(f"  {info.dist}: {error}")
    slow = [i for i in infos if i.status == "slow"]
    if slow:
        click.echo(f"\nslow to load (budget {plugin_budget():g} s, {BUDGET_ENV}); every command waits for them:")
        for info in slow:
            click.echo(f"  {info.dist}: {info.load_seconds:.2f} s to import and register")


@click.command("list")
@click.argument("kind", required=False)
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
def list_components(kind: str | None, pattern: str | None, as_json: bool) -> None:
    """List components, optionally of one KIND (model, filter, sae, visualizer) matching PATTERN.

    PATTERN is a substring, or a glob when it holds *, ? or [.
    """
    components = default_registry().list(kind, pattern)
    if as_json:
        echo_json(
            [
                {
                    "kind": c.kind,
                    "name": c.name,
                    "qualified_name": c.qualified_name,
                    "dist": c.dist,
                    "version": c.version,
                    "aliases": list(c.spec.aliases),
                    "summary": c.spec.summary,
                }
                for c in components
            ]
        )
        return
    if not components:
        click.echo("no components match")
        return
    echo_table(
        ["KIND", "NAME", "DIST", "ALIASES", "SUMMARY"],
        [(c.kind, c.name, c.dist, list(c.spec.aliases), c.spec.summary) for c in components],
    )


@click.command()
@click.argument("kind")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
def info(kind: str, name: str, as_json: bool) -> None:
    """Describe one component: summary, source and parameters."""
    described = default_registry().describe(kind, name)
    if as_json:
        echo_json(described)
        return
    click.echo(f"{described['kind']} {described['name']}  ({described['dist']} {described['version']})")
    if described["summary"]:
        click.echo(f"  {described['summary']}")
    if described["aliases"]:
        click.echo(f"  aliases: {', '.join(described['aliases'])}")
    click.echo(f"  qualified name: {described['qualified_name']}")
    click.echo(f"  source: {described['source']}")
    if not described["params"]:
        click.echo("parameters: none")
        return
    click.echo("parameters:")
    rows = []
    for p in described["params"]:
        constraints = []
        if p["choices"] is not None:
            constraints.append("one of " + "|".join(str(c) for c in p["choices"]))
        if p["min"] is not None:
            constraints.append(f">= {p['min']}")
        if p["max"] is not None:
            constraints.append(f"<= {p['max']}")
        rows.append((p["name"], p["type"], json.dumps(p["default"]), ", ".join(constraints) or "-", p["help"]))
    echo_table(["NAME", "TYPE", "DEFAULT", "CONSTRAINTS", "HELP"], rows)


def _run_pip(args: list[str]) -> None:
    command = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(command)
    if result.returncode != 0:
        raise ConvlensError(f"pip {args[0]} failed with exit code {result.returncode}")


def _plugin_rows_in_fresh_process() -> dict[str, dict]:
    """Plugin table from a new interpreter, so freshly installed (also editable) packages are seen."""
    result = subprocess.run(
        [sys.executable, "-m", "convlens", "plugins", "--all", "--json"], capture_output=True, text=True
    )
    if result.returncode != 0:
        return {}
    return {canonical_dist(row["dist"]): row for row in json.loads(result.stdout)}


@click.command()
@click.argument("packages", nargs=-1)
@click.option("-U", "--upgrade", is_flag=True, help="Upgrade packages that are already installed.")
@click.option(
    "-e",
    "--editable",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Install a local project in editable mode (repeatable).",
)
def install(packages: tuple[str, ...], upgrade: bool, editable: tuple[str, ...]) -> None:
    """Install plugin packages with pip into this environment, then show the plugins that appeared."""
    if not packages and not editable:
        raise click.UsageError("name at least one package or -e PATH")
    before = installed_plugin_dists()
    args = ["install", *(["--upgrade"] if upgrade else [])]
    for path in editable:
        args += ["-e", path]
    _run_pip(args + list(packages))
    rows = _plugin_rows_in_fresh_process()
    changed = 0
    for key, row in sorted(rows.items()):
        old = {canonical_dist(d): v for d, v in before.items()}.get(key)
        if old == row["version"] or row["builtin"]:
            continue
        changed += 1
        counts = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in row["components"].items() if n)
        verb = "installed" if old is None else f"upgraded from {old} to"
        line = f"{verb} plugin {row['dist']} {row['version']}: {row['status']}"
        click.echo(line + (f" ({counts})" if counts else "") + (f"\n  error: {row['error']}" if row["error"] else ""))
    if not changed:
        click.echo("no new or changed convlens plugin (does the package declare a 'convlens' entry point?)")


@click.command()
@click.argument("packages", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def uninstall(packages: tuple[str, ...], yes: bool) -> None:
    """Uninstall plugin packages with pip, then show the plugins that went."""
    if not yes:
        click.confirm(f"Uninstall {', '.join(packages)}?", abort=True)
    before = installed_plugin_dists()
    _run_pip(["uninstall", "-y", *packages])
    import importlib

    importlib.invalidate_caches()
    after = installed_plugin_dists()
    gone = sorted(set(before) - set(after))
    for dist in gone:
        click.echo(f"removed plugin {dist} {before[dist]}")
    if not gone:
        click.echo("no convlens plugin was removed")
