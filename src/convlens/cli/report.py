"""``convlens report``: a static HTML site of a pipeline run folder."""

from __future__ import annotations

import click

from .output import echo_json


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--out", "-o", default=None, type=click.Path(file_okay=False), help="Folder for the site (default: RUN_DIR/report)."
)
@click.option(
    "--copy-images",
    is_flag=True,
    help="Copy the pictures into OUT/assets, so that the site can be moved without the run folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def report_command(run_dir: str, out: str | None, copy_images: bool, as_json: bool) -> None:
    """Build a static HTML report of a `convlens run` folder: overview, one page per CNN unit and SAE latent, a
    sortable index of them, and the CNN units beside the SAE latents. Reads the run's JSON and PNG files and
    recomputes nothing; open index.html in a browser (no server needed, nothing is fetched from the network).

    Example: convlens report runs/demo && xdg-open runs/demo/report/index.html
    """
    from convlens.report.site import build_report

    summary = build_report(run_dir, out, copy_images=copy_images)
    if as_json:
        echo_json(summary)
        return
    for line in summary["notes"]:
        click.echo(f"note: {line}")
    groups = ", ".join(
        f"{values['pages']} {'CNN channels' if label == 'cnn' else label + ' latents'} "
        f"({values['visualised']} visualised)"
        for label, values in summary["groups"].items()
    )
    copied = f", {summary['images_copied']} images copied" if copy_images else ""
    click.echo(
        f"report of '{summary['title']}': {summary['pages']} pages ({groups or 'no units'}), "
        f"{len(summary['notes'])} notes, {len(summary['warnings'])} run warnings{copied}; "
        f"open {summary['index']}"
    )
