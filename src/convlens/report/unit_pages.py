"""The report's pages about units: ``units.html`` (every CNN unit and SAE latent in one sortable, filterable table
with thumbnails), ``units/GROUP-N.html`` (a page per unit: statistics, best concept, every figure that a visualizer
run lists for it) and ``compare.html`` (the top visualised CNN units beside the top latents of each SAE, one row per
rank (paper 001 sec. 9.3), and the least active units of each group).

Which picture stands for a unit, and which figures are drawn small, is what the visualizers declared in their
records (see :class:`~convlens.report.reader.Figure`).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from convlens.report.links import Links
from convlens.report.pages import Content, attrs, cell, esc, facts, fmt, is_number, metric, note, table
from convlens.report.run_folder import Figure, Group, RunFolder, UnitStatistics, VisualRun, finite_number

EXAMPLES_SHOWN = 3
LEAST_SHOWN = 5
RARE_FREQUENCY = 0.01
STATISTIC_COLUMNS = (  # UnitStatistics field, column title, data-metric name, format
    ("frequency", "frequency", "frequency", "pct"),
    ("image_frequency", "image freq.", "image-frequency", "pct"),
    ("mean", "mean", "mean", "num"),
    ("max", "max", "max", "num"),
    ("mean_image_max", "mean image max", "mean-image-max", "num"),
    ("share", "share", "share", "pct"),
)
INDEX_COLUMNS = (  # data-key, title, data-type (None: not sortable)
    ("group", "group", "text"),
    ("unit", "unit", "number"),
    ("rank", "rank", "number"),
    *((name, title, "number") for _, title, name, _ in STATISTIC_COLUMNS),
    ("dead", "dead", "text"),
    ("best-concept", "best concept", "text"),
    ("auroc", "AUROC", "number"),
    ("selective", "selective", "text"),
    ("visualised", "visualised", "text"),
    ("picture", "picture", None),
)


REASON_TEXTS = {
    "share": "one of the top units by share of the activation",
    "selective": "one of the most selective units (highest concept AUROC)",
    "frequent": "one of the units firing on the most images",
}

ASCENDING_FIRST = {"unit": "ascending", "rank": "ascending"}  # number columns read from the smallest (rank 1) first


def reasons_text(reasons: list[str]) -> str:
    """E.g. 'one of the top units by share of the activation and one of the most selective units (...)'."""
    return " and ".join(REASON_TEXTS.get(reason, reason) for reason in reasons)


def ablation_effect(changes: list[tuple[Any, Any]]) -> str:
    """What zeroing a latent does to the class logits, from its three most lowered classes (mean change): the
    classes it lowers, or, when it lowers none of them, that it raises even the least raised."""
    lowered = [(label, change) for label, change in changes if is_number(change) and change < 0]
    listed = ", ".join(f"{label} {fmt(change, 'signed')}" for label, change in (lowered or changes))
    if lowered:
        return f"zeroing it lowers the class logits most for {listed} (mean change)"
    if changes:
        return f"zeroing it lowers no class logit; even the least raised go up: {listed} (mean change)"
    return "zeroing it changes no class logit"


def concept_text(stats: UnitStatistics | None) -> str:
    """E.g. ``shape=star``: the unit's best concept value, or '' when it has none."""
    best = stats.best if stats is not None else None
    return f"{best.attribute}={best.value}" if best is not None and best.attribute else ""


class UnitPages:
    """The pages of ``run``'s units and latents."""

    def __init__(self, run: RunFolder, links: Links):
        self.run = run
        self.links = links

    # -- the units index ------------------------------------------------------------------------------------------

    def units_index(self) -> Content:
        path = self.links.units_index
        head = "".join(
            f"<th{attrs({'data-key': key, 'data-type': kind, 'data-first': ASCENDING_FIRST.get(key)})}"
            f"{attrs({'class': 'num' if kind == 'number' else None})}>"
            + (f'<button type="button">{esc(title)}</button>' if kind else esc(title))
            + "</th>"
            for key, title, kind in INDEX_COLUMNS
        )
        rows = [self.index_row(path, group, unit) for group in self.run.groups.values() for unit in group.all_units()]
        total = len(rows)
        explanation = (
            "<p>Click a column title to sort. Frequency: the share of (image, position) cells where the "
            "unit is above zero; image freq.: the share of images where it fires somewhere; share: its "
            "part of the group's total |activation| (rank 1 = largest); best concept: the concept value "
            "whose AUROC is highest.</p>"
        )
        body = (
            explanation
            + self.index_controls(total)
            + f'<table id="unit-table">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(rows)
            + "\n</tbody>\n</table>"
        )
        if not rows:
            body += note("No units: the run has neither unit statistics nor visualizer runs.")
        groups = ", ".join(g.short for g in self.run.groups.values()) or "no group"
        return Content("Units and latents", body, f"{total} units and latents of {groups}", script=True)

    def index_controls(self, total: int) -> str:
        options = '<option value="">all groups</option>' + "".join(
            f'<option value="{esc(g.label)}">{esc(g.title)}</option>' for g in self.run.groups.values()
        )
        return (
            '<div class="controls">'
            '<label>Filter <input type="search" id="unit-filter" placeholder="unit, concept, e.g. shape=star">'
            "</label>"
            f'<label>Group <select id="group-filter">{options}</select></label>'
            '<label><input type="checkbox" id="hide-dead"> hide dead</label>'
            '<label><input type="checkbox" id="visualised-only"> visualised only</label>'
            f'<span id="unit-count" class="muted">{total} of {total} shown</span></div>'
        )

    def index_row(self, path: Path, group: Group, unit: int) -> str:
        stats = group.units.get(unit)
        visualised = unit in group.visualised
        concept = concept_text(stats)
        dead = stats.dead if stats is not None else None
        selective = stats.selective if stats is not None else ""
        thumbnail = group.thumbnail(unit)
        picture = (
            f'<img class="thumb" src="{esc(self.links.image_url(path, thumbnail.path))}" alt="'
            f'{esc(group.unit_title(unit))}" width="48" height="48">'
            if thumbnail
            else ""
        )
        search = " ".join((group.label, group.unit_title(unit), concept, selective)).lower()
        cells = [
            f"<td>{esc(group.short)}</td>",
            f'<td class="num" data-sort="{unit}"><a href="{self.links.unit_url(path, group, unit)}">{unit}</a></td>',
            cell(stats.rank if stats is not None else None, "int"),
        ]
        cells += [
            cell(getattr(stats, field) if stats is not None else None, style)
            for field, _, _, style in STATISTIC_COLUMNS
        ]
        cells += [
            f"<td>{'' if dead is None else ('dead' if dead else 'no')}</td>",
            f"<td>{esc(concept)}</td>",
            cell(stats.best.auroc if stats is not None and stats.best is not None else None),
            f"<td>{esc(selective)}</td>",
            f"<td>{'yes' if visualised else ''}</td>",
            f"<td>{picture}</td>",
        ]
        row_attrs = attrs(
            {
                "data-group": group.label,
                "data-unit": unit,
                "data-dead": "true" if dead else "false",
                "data-visualised": "true" if visualised else "false",
                "data-search": search,
            }
        )
        return f"<tr{row_attrs}>{''.join(cells)}</tr>"

    # -- a unit's page --------------------------------------------------------------------------------------------

    def unit_page(self, group: Group, unit: int, before: int | None, after: int | None) -> Content:
        path = self.links.unit_page(group, unit)
        stats = group.units.get(unit)
        parts = [self.pager(path, group, before, after)]
        if stats is None:
            parts.append(note("No statistics for this unit in statistics/statistics.json."))
        else:
            parts.append("<h2>Statistics</h2>" + self.statistics_facts(group, stats))
        ablation = self.run.ablation_of(group, unit)
        if ablation is not None:
            text = (
                f"Active on {fmt(ablation.images_active, 'int')} of the ablation images; "
                f"{ablation_effect(ablation.most_lowered)}."
            )
            parts.append("<h2>Zeroing this latent in the spliced model</h2><p>" + esc(text) + "</p>")
        figures = group.figures_of(unit)
        if group.flags.get(unit):
            parts.append(
                '<p class="flagged">Flagged: ' + esc("; ".join(group.flags[unit])) + ". The picture below does not "
                "show what the unit responds to.</p>"
            )
        if group.reasons.get(unit):
            parts.append(f'<p class="muted">Pictured as {esc(reasons_text(group.reasons[unit]))}.</p>')
        if unit not in group.visualised and not figures:
            parts.append(self.render_hint(group, unit))
        for run, found in figures:
            parts.append(self.run_figures(path, run, unit, found))
        if unit in group.visualised and not figures:
            parts.append(note("This unit was visualised, but no visualizer run lists a figure for it."))
        subtitle = f"{group.title} at layer {'?' if self.run.layer is None else self.run.layer}"
        return Content(group.unit_title(unit), "\n".join(parts), subtitle)

    def render_hint(self, group: Group, unit: int) -> str:
        """Why this unit has no pictures, and the commands that render it as the run's visualizers did."""
        listed = ", ".join(str(u) for u in group.visualised)
        text = (
            f"The run pictured {len(group.visualised)} {group.title} ({listed}); this page shows the statistics only."
            if listed
            else f"No visualizer ran on the {group.title}; this page shows the statistics only."
        )
        commands = [(run.name, run.command_for(unit)) for run in group.runs]
        runnable = [shlex.join(words) for _, words in commands if words]
        if runnable:
            text += " To render it as the run's visualizers did, run:"
        parts = [note(text)]
        if runnable:
            parts.append('<pre class="command" id="render-command"><code>' + esc("\n".join(runnable)) + "</code></pre>")
        on_images = [run.name for run in group.runs if run.on_top_images]
        if on_images:
            parts.append(
                f'<p class="muted">{esc(", ".join(on_images))} explained each unit on the images it responds to '
                "most: give those images (<code>convlens visualize dataset-examples</code> finds them) to "
                "<code>convlens visualize</code> with <code>--data</code>.</p>"
            )
        return "".join(parts)

    def pager(self, path: Path, group: Group, before: int | None, after: int | None) -> str:
        """Links to the previous unit, the units index and the next unit."""
        previous = (
            f'<a href="{self.links.unit_url(path, group, before)}" rel="prev">&larr; '
            f"{esc(group.unit_title(before))}</a>"
            if before is not None
            else '<span class="muted">first</span>'
        )
        following = (
            f'<a href="{self.links.unit_url(path, group, after)}" rel="next">{esc(group.unit_title(after))} &rarr;</a>'
            if after is not None
            else '<span class="muted">last</span>'
        )
        index = f'<a href="{self.links.page_url(path, self.links.units_index)}">index of units</a>'
        return f'<nav class="pager">{previous}{index}{following}</nav>'

    @staticmethod
    def statistics_facts(group: Group, stats: UnitStatistics) -> str:
        unit = stats.unit
        count = group.summary.units if group.summary else len(group.units)
        items = [
            (
                "rank by share",
                metric(stats.rank, "rank", "int", tag="span", group=group.label, unit=unit)
                + f" of {esc(fmt(count, 'int'))}",
            )
        ]
        items += [
            (title, metric(getattr(stats, field), name, style, tag="span", group=group.label, unit=unit))
            for field, title, name, style in STATISTIC_COLUMNS
        ]
        items.append(("dead", "yes, never above zero on these images" if stats.dead else "no"))
        if stats.best is not None:
            items.append(
                (
                    "best concept",
                    f"{esc(stats.best.attribute)}={esc(stats.best.value)}, AUROC "
                    + metric(stats.best.auroc, "best-concept-auroc", tag="span", group=group.label, unit=unit),
                )
            )
        items.append(("selective", esc(stats.selective or "no (no single concept value reaches the threshold)")))
        return facts(items)

    def run_figures(self, path: Path, run: VisualRun, unit: int, found: list[Figure]) -> str:
        """The figures one visualizer run lists for ``unit``, and its table of examples when it has one."""
        pictures = "".join(
            self.links.picture(path, f.path, f.caption, kind=f.kind, css="small" if f.small else "") for f in found
        )
        parts = [f"<h2>{esc(run.name)}</h2>", f'<div class="figures">{pictures}</div>']
        examples = run.examples.get(unit)
        if examples:
            rows = [
                [
                    f"<td>{e.side}</td>",
                    cell(e.rank, "int"),
                    f"<td>{esc(e.image)}</td>",
                    cell(e.value),
                    f"<td>{esc(', '.join(str(p) for p in e.peak)) if e.peak else ''}</td>",
                ]
                for e in examples
            ]
            parts.append(
                table(
                    ["side", "#", "image", "activation at the peak", "peak cell (row, column)"],
                    rows,
                    numeric=[1, 3],
                    **{"class": "examples"},
                )
            )
        return "\n".join(parts)

    # -- the side-by-side -----------------------------------------------------------------------------------------

    def compare(self) -> Content:
        path = self.links.compare
        groups = [g for g in self.run.groups.values() if g.visualised]
        parts = [
            "<p>The top units of the CNN layer beside the top latents of each SAE, ranked by their share of the "
            "group's activation (paper sec. 9.3.1: the paper picked them on one image by hand; here the whole "
            "dataset ranks them). Each cell shows the feature visualisation, the top dataset examples, how often "
            "the unit fires and its best concept.</p>"
        ]
        if not groups:
            parts.append(note("No visualizer runs in this run, so there is nothing to set side by side."))
        else:
            rows = [
                [f'<td class="num">{rank + 1}</td>']
                + [
                    self.compare_cell(path, g, g.visualised[rank]) if rank < len(g.visualised) else "<td></td>"
                    for g in groups
                ]
                for rank in range(max(len(g.visualised) for g in groups))
            ]
            parts.append(
                table(["rank"] + [g.title for g in groups], rows, numeric=[0], id="side-by-side", **{"class": "side"})
            )
        least = self.least_section(path)
        if least:
            parts.append("<h2>Least active units</h2>" + least)
        layer = "?" if self.run.layer is None else self.run.layer
        return Content("CNN units and SAE latents side by side", "\n".join(parts), f"layer {layer}")

    def compare_cell(self, path: Path, group: Group, unit: int) -> str:
        """The unit's title, its thumbnail, its top examples, how often it fires and its best concept."""
        stats = group.units.get(unit)
        link = self.links.unit_url(path, group, unit)
        parts = [f'<a href="{link}"><strong>{esc(group.unit_title(unit))}</strong></a>']
        thumbnail = group.thumbnail(unit)
        if thumbnail is not None:
            parts.append(
                f'<div><a href="{link}"><img src="{esc(self.links.image_url(path, thumbnail.path))}" alt="'
                f'{esc(thumbnail.caption or thumbnail.kind)}" width="96" height="96"></a></div>'
            )
        examples = [f for _, found in group.figures_of(unit) for f in found if f.top_example][:EXAMPLES_SHOWN]
        if examples:
            parts.append(
                '<div class="examples">'
                + "".join(
                    f'<img src="{esc(self.links.image_url(path, f.path))}" alt="{esc(f.caption or f.kind)}" title="'
                    f'{esc(f.caption)}" width="48" height="48">'
                    for f in examples
                )
                + "</div>"
            )
        facts_line = []
        if stats is not None:
            facts_line.append(
                "fires on "
                + metric(stats.frequency, "frequency", "pct", tag="span", group=group.label, unit=unit)
                + " of positions"
            )
        if stats is not None and stats.best is not None:
            best = stats.best
            facts_line.append(f"best concept {esc(best.attribute)}={esc(best.value)} (AUROC {esc(fmt(best.auroc))})")
        if facts_line:
            parts.append("<div>" + "; ".join(facts_line) + "</div>")
        return f'<td data-group="{esc(group.label)}" data-unit="{unit}">' + "".join(parts) + "</td>"

    def least_section(self, path: Path) -> str:
        """Per group: dead units, the median frequency, and the units with the smallest share (sec. 9.3.2)."""
        groups = [g for g in self.run.groups.values() if g.units]
        if not groups:
            return ""
        rows = [self.least_row(group) for group in groups]
        details = [self.least_units(path, group) for group in groups]
        return table(
            ["group", "units", "dead", "dead share", "firing on < 1 % of positions", "median frequency"],
            rows,
            numeric=[1, 2, 3, 4, 5],
            id="least-table",
        ) + "".join(details)

    @staticmethod
    def least_row(group: Group) -> list[str]:
        entries = [group.units[u] for u in sorted(group.units)]
        frequencies = sorted(f for f in (finite_number(e.frequency) for e in entries) if f is not None)
        median = frequencies[len(frequencies) // 2] if frequencies else None
        dead = sum(1 for e in entries if e.dead)
        rare = sum(1 for f in frequencies if f < RARE_FREQUENCY)
        return [
            f"<td>{esc(group.title)}</td>",
            cell(len(entries), "int"),
            metric(dead, "dead", "int", group=group.label),
            metric(dead / len(entries), "dead-share", "pct", group=group.label),
            metric(rare, "rare", "int", group=group.label),
            metric(median, "median-frequency", "pct", group=group.label),
        ]

    def least_units(self, path: Path, group: Group) -> str:
        """The units of ``group`` with the smallest share of its activation, linked to their pages."""
        entries = [group.units[u] for u in sorted(group.units)]
        least = sorted(entries, key=lambda e: (finite_number(e.share) is None, finite_number(e.share) or 0.0, e.unit))[
            :LEAST_SHOWN
        ]
        items = [
            f'<a href="{self.links.unit_url(path, group, e.unit)}">{e.unit}</a> (share '
            f"{esc(fmt(e.share, 'pct'))}{', dead' if e.dead else ''})"
            for e in least
        ]
        return f"<p>{esc(group.title)} with the least activation: " + ", ".join(items) + ".</p>"
