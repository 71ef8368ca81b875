"""The report's ``index.html``: the run, its steps and warnings, the model, the filter comparison with foreground
precision (paper 001 Figures 8-9), SAE metrics and curves, the sweep's Pareto frontier, spliced accuracy, how many
CNN channels and SAE latents are selective for one concept, the visualizer runs, and the notes on what is missing.

The numbers the paper's workflow is judged by carry ``data-metric`` attributes (see :func:`~convlens.report.pages.
metric`), so that tests and scripts can read them back from the HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from convlens.report.attribution_bench_page import scores_table
from convlens.report.links import Links
from convlens.report.pages import Content, cell, esc, facts, fmt, metric, note, raw, table
from convlens.report.run_folder import (
    AttributionBench,
    FilterComparison,
    FilterSaes,
    ForegroundPrecision,
    Group,
    GroupSummary,
    LatentAblation,
    ModelTraining,
    Predictions,
    RunFolder,
    SaeRun,
    SanityCheck,
    SpliceEvaluation,
    Sweep,
    finite_number,
    slug,
)
from convlens.report.unit_pages import ablation_effect

OVERLAYS_SHOWN = 4
HARDEST_SHOWN = 5
SIMILARITY_MEASURES = (("cosine", "cosine similarity"), ("spearman", "Spearman rank correlation"))


def top5_says_something(classes: int | None) -> bool:
    """Top-5 accuracy is shown only for more than 5 classes (with 5 or fewer it is 100 % by construction);
    ``None``: the class count is not known."""
    return classes is None or classes > 5


def shown(value: Any, default: str) -> Any:
    """``value``, or ``default`` when the run does not say."""
    return default if value is None else value


def figures_row(pictures: list[str]) -> str:
    return '<div class="figures">' + "".join(pictures) + "</div>"


def compact_list(items: list[str], **attributes: str) -> str:
    """A compact ``<ul>`` of already escaped items."""
    extra = "".join(f' {key}="{value}"' for key, value in attributes.items())
    return f'<ul class="compact"{extra}>' + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


class Overview:
    """The overview page of ``run``; every section is a method returning HTML."""

    def __init__(self, run: RunFolder, links: Links):
        self.run = run
        self.links = links
        self.path = links.index

    def render(self) -> Content:
        """The page. Render it after every other page, so that it can list every note."""
        sections = [
            ("warnings", "Warnings", self.warnings_section()),
            ("run", "Run", self.run_section()),
            ("steps", "Steps", self.steps_section()),
            ("model", "Model", self.model_section(self.run.model)),
            ("gallery", "Pictured units", self.gallery_section()),
            *self.attribution_sections(),
            ("filters", "Activation filters", self.filters_section(self.run.comparison)),
            ("saes", "Sparse autoencoders", self.saes_section()),
            *self.filter_saes_sections(),
            ("sweep", "Pareto frontier", self.sweep_section(self.run.sweep)),
            ("splice", "Spliced accuracy", self.splice_section()),
            ("selectivity", "Concept selectivity", self.selectivity_section()),
            ("units", "Units and latents", self.units_section()),
            ("notes", "Notes on this report", self.notes_section()),
        ]
        contents = " &middot; ".join(f'<a href="#{key}">{esc(name)}</a>' for key, name, _ in sections)
        body = f"<p>{contents}</p>\n" + "\n".join(
            f'<section id="{key}">\n<h2>{esc(name)}</h2>\n{html}\n</section>' for key, name, html in sections
        )
        subtitle = f"{shown(self.run.model_name, 'model')} at layer {shown(self.run.layer, '?')}"
        return Content(self.run.title, body, subtitle)

    # -- the run ------------------------------------------------------------------------------------------------

    def run_section(self) -> str:
        run = self.run
        params = f" ({esc(', '.join(f'{k}={v}' for k, v in run.model_params.items()))})" if run.model_params else ""
        concepts = (
            "" if run.data_concepts is None else ", with concept labels" if run.data_concepts else ", no concept labels"
        )
        data = (
            f"<code>{esc(shown(run.data_path, 'n/a'))}</code>, "
            f'<span data-metric="images" data-value="{esc(raw(run.data_images))}">'
            f"{esc(fmt(run.data_images, 'int'))}</span> images" + concepts
        )
        items = [
            ("model", f"<code>{esc(shown(run.model_name, 'n/a'))}</code>" + params),
            ("layer", f"<code>{esc(shown(run.layer, 'n/a'))}</code>"),
            ("data", data),
            ("filters", esc(", ".join(run.filter_names) or "n/a")),
            ("SAEs", esc(", ".join(sae.label for sae in run.saes) or "none")),
            ("started", esc(shown(run.started, "n/a"))),
            ("finished", esc(run.finished or "not finished")),
        ]
        if run.versions:
            items.append(("versions", esc(", ".join(f"{k} {v}" for k, v in run.versions.items()))))
        pages = sum(len(g.all_units()) for g in run.groups.values())
        links = (
            f'<p>Browse <a href="{self.links.page_url(self.path, self.links.units_index)}">every unit and '
            f'latent</a> ({pages} pages) or <a href="{self.links.page_url(self.path, self.links.compare)}">the '
            "CNN units beside the SAE latents</a>.</p>"
        )
        return facts(items) + links

    def steps_section(self) -> str:
        steps = self.run.steps
        if not steps:
            return note("pipeline.json lists no steps")
        rows = [
            [
                f"<td>{esc(shown(step.name, '?'))}</td>",
                f'<td class="status-{esc(slug(step.status))}" data-step="{esc(step.name)}">{esc(step.status)}</td>',
                cell(step.seconds, "sec"),
                f"<td>{esc(', '.join(step.outputs))}</td>",
            ]
            for step in steps
        ]
        total = sum(finite_number(step.seconds) or 0.0 for step in steps)
        this_run = sum(finite_number(step.seconds) or 0.0 for step in steps if step.status != "skipped")
        counts: dict[str, int] = {}
        for step in steps:
            counts[step.status] = counts.get(step.status, 0) + 1
        line = ", ".join(f"{count} {status}" for status, count in counts.items())
        return (
            table(["step", "status", "seconds", "outputs"], rows, numeric=[2], id="steps-table")
            + f'<p class="muted">{esc(line)}; {esc(fmt(total, "sec"))} of work in all, '
            f"{esc(fmt(this_run, 'sec'))} in the last run (a skipped step shows the time it took when it ran).</p>"
        )

    def warnings_section(self) -> str:
        if not self.run.warnings:
            return '<p class="muted">The run reported no warnings.</p>'
        return compact_list([esc(w) for w in self.run.warnings], id="run-warnings")

    def notes_section(self) -> str:
        if not self.run.notes:
            return '<p class="muted">None: every part the run names was found.</p>'
        return compact_list([esc(n) for n in self.run.notes])

    # -- the model and the filters ----------------------------------------------------------------------------------

    def model_section(self, model: ModelTraining | None) -> str:
        if model is None:
            return note("No model training in this run.")
        parts = []
        if model.final is not None:
            final = model.final
            items = [
                ("epochs", esc(fmt(final.epoch, "int"))),
                ("validation top-1", metric(final.val_top1, "model-val-top1", "pct", tag="span")),
                ("training top-1", metric(final.train_top1, "model-train-top1", "pct", tag="span")),
                ("validation loss", metric(final.val_loss, "model-val-loss", tag="span")),
            ]
            if model.classes is not None:
                items.insert(1, ("classes", esc(fmt(model.classes, "int"))))
            if top5_says_something(model.classes):
                items.insert(3, ("validation top-5", metric(final.val_top5, "model-val-top5", "pct", tag="span")))
            parts.append(facts(items))
        else:
            parts.append(note("model/metrics.jsonl is missing or empty"))
        if model.hardest:
            parts.append(
                "<p>Hardest classes: "
                + esc(", ".join(f"{c.name} {fmt(c.accuracy, 'pct')}" for c in model.hardest[:HARDEST_SHOWN]))
                + ".</p>"
            )
        parts.append(
            figures_row(
                [
                    self.links.picture(
                        self.path, model.curves, "training curves (loss and accuracy per epoch)", css="wide"
                    ),
                    self.links.picture(
                        self.path,
                        model.error_analysis,
                        "classes with the least and most error, most-confused pairs",
                        css="wide",
                    ),
                ]
            )
        )
        return "\n".join(parts)

    def attribution_sections(self) -> list[tuple[str, str, str]]:
        """The predictions and the sanity check, for runs that have them."""
        sections = []
        if self.run.predictions is not None:
            sections.append(("predictions", "Predictions", self.predictions_section(self.run.predictions)))
        if self.run.sanity is not None:
            sections.append(("sanity", "Sanity check", self.sanity_section(self.run.sanity)))
        if self.run.attribution_bench is not None:
            bench = self.run.attribution_bench
            sections.append(("attribution-bench", "Attribution methods", self.attribution_bench_section(bench)))
        return sections

    def attribution_bench_section(self, bench: AttributionBench) -> str:
        record = bench.record
        parts = [
            f"<p>Every installed attribution method scored on every metric that applies (<code>convlens bench "
            f"attribution</code>), at <code>{esc(shown(record.get('layer'), '?'))}</code> on "
            f"{esc(len(record.get('images') or []))} images: the mean per image with its bootstrap interval; "
            "the best of each metric in bold.</p>",
            scores_table(record),
        ]
        figures = [self.links.picture(self.path, bench.chart, "each metric's mean and interval per method")]
        figures.append(self.links.picture(self.path, bench.maps, "each method's maps of the first images"))
        parts.append(figures_row([figure for figure in figures if figure]))
        if bench.page is not None:
            parts.append(
                f'<p><a href="{esc(self.links.image_url(self.path, bench.page))}">The benchmark page</a> '
                "also lists each method's cost.</p>"
            )
        return "\n".join(parts)

    def predictions_section(self, predictions: Predictions) -> str:
        parts = [
            f"<p>The model's top classes per image, and <code>{esc(shown(predictions.method, '?'))}</code> of its "
            f"top class at <code>{esc(shown(predictions.layer, '?'))}</code> over each image.</p>"
        ]
        if predictions.labelled:
            parts.append(
                f'<p data-metric="top1-hits" data-value="{esc(raw(predictions.top1_hits))}">Of '
                f"{esc(fmt(predictions.labelled, 'int'))} images with a known label: top-1 "
                f"{esc(fmt(predictions.top1_hits, 'int'))}"
                + (
                    f", top-5 {esc(fmt(predictions.top5_hits, 'int'))}"
                    if top5_says_something(predictions.classes)
                    else ""
                )
                + ".</p>"
            )
        rows = [
            [
                f"<td>{esc(row.image)}</td>",
                f"<td>{esc(', '.join(name + ' (' + fmt(p, 'pct') + ')' for name, p in row.top))}</td>",
                f"<td>{esc(row.label or '')}{' &check;' if row.top1_hit else ''}</td>",
            ]
            for row in predictions.rows
        ]
        parts.append(table(["image", "top classes", "label"], rows, id="predictions-table"))
        pictures = [self.links.picture(self.path, row.overlay, row.image, css="overlay") for row in predictions.rows]
        parts.append(figures_row([picture for picture in pictures if picture]))
        return "\n".join(parts)

    def sanity_section(self, sanity: SanityCheck) -> str:
        parts = [
            f"<p>Cascading randomisation (Adebayo et al. 2018) at <code>{esc(shown(sanity.layer, '?'))}</code> on "
            f"{sanity.images} images: the blocks are re-initialised from the output down, and each method's maps "
            "are compared with the trained model's by Spearman rank correlation. A method that explains the model "
            "loses the correlation; one that only looks at the image keeps 1.</p>"
        ]
        rows = [
            [f"<td>{esc(step)}</td>"]
            + [cell(values[number] if number < len(values) else None) for values in sanity.spearman.values()]
            for number, step in enumerate(sanity.steps)
        ]
        headers = ["randomised", *(f"{method} Spearman" for method in sanity.spearman)]
        parts.append(table(headers, rows, numeric=list(range(1, len(headers))), id="sanity-table"))
        figures = [self.links.picture(self.path, sanity.chart, "mean Spearman per step")]
        figures += [self.links.picture(self.path, picture, picture.stem) for picture in sanity.cascades]
        parts.append(figures_row([figure for figure in figures if figure]))
        return "\n".join(parts)

    def filters_section(self, comparison: FilterComparison | None) -> str:
        if comparison is None:
            return note("No filter comparison in this run.")
        parts = [
            f"<p>Filters compared at <code>{esc(shown(comparison.layer, '?'))}</code> on "
            f"{esc(fmt(comparison.images, 'int'))} images, {esc(fmt(comparison.samples_per_image, 'int'))} "
            "samples per image (paper sec. 7.3-7.4).</p>"
        ]
        if comparison.findings:
            parts.append(compact_list([esc(f) for f in comparison.findings]))
        if comparison.precision is not None:
            parts.append(self.precision_table(comparison.precision))
        else:
            parts.append(note("Foreground precision was not scored (the data has no masks)."))
        parts += [
            self.similarity_table(comparison, measure, label)
            for measure, label in SIMILARITY_MEASURES
            if measure in comparison.similarity
        ]
        parts.append(
            figures_row(
                [
                    self.links.picture(self.path, comparison.cosine, "cosine similarity (Figure 9, left)"),
                    self.links.picture(self.path, comparison.spearman, "Spearman rank correlation (Figure 9, right)"),
                    self.links.picture(
                        self.path,
                        comparison.precision_picture,
                        "foreground precision of sampled patches against uniform sampling",
                    ),
                ]
            )
        )
        overlays = [o for o in comparison.overlays[:OVERLAYS_SHOWN] if o is not None]
        if overlays:
            parts.append("<h3>Patch weights and ranks per filter (Figure 8)</h3>")
            parts.append(figures_row([self.links.picture(self.path, o, o.name, css="overlay") for o in overlays]))
        return "\n".join(parts)

    @staticmethod
    def precision_table(precision: ForegroundPrecision) -> str:
        text = (
            "<h3>Foreground precision</h3>\n"
            f"<p>The share of sampled patches that lie mostly (at least {esc(fmt(precision.threshold, 'pct'))} "
            f"of their pixels) on the object, over {esc(fmt(precision.images, 'int'))} images with masks; the "
            "interval is the 95 % interval of the per-image difference between the filter's expected precision "
            "and uniform sampling's.</p>\n"
        )
        rows = [
            [
                "<td>uniform (baseline)</td>",
                metric(precision.uniform, "foreground-precision-uniform"),
                metric(precision.uniform, "foreground-precision-expected", filter="uniform"),
                "<td></td>",
                "<td></td>",
                "<td></td>",
                "<td>baseline</td>",
                "<td></td>",
            ]
        ]
        for row in precision.filters:
            name = row.name
            rows.append(
                [
                    f"<td>{esc(name)}</td>",
                    metric(row.sampled, "foreground-precision", filter=name),
                    metric(row.expected, "foreground-precision-expected", filter=name),
                    metric(row.difference, "foreground-precision-difference", "signed", filter=name),
                    metric(row.ci_low, "foreground-precision-ci-low", "signed", filter=name),
                    metric(row.ci_high, "foreground-precision-ci-high", "signed", filter=name),
                    f"<td>{esc(row.verdict)}</td>",
                    metric(row.fallback_rate, "fallback-rate", "pct", filter=name),
                ]
            )
        return text + table(
            [
                "filter",
                "sampled precision",
                "expected precision",
                "difference to uniform",
                "95 % CI low",
                "95 % CI high",
                "verdict",
                "uniform fallbacks",
            ],
            rows,
            numeric=[1, 2, 3, 4, 5, 7],
            id="foreground-precision-table",
        )

    @staticmethod
    def similarity_table(comparison: FilterComparison, measure: str, label: str) -> str:
        names = comparison.filters
        rows = [
            [f"<th>{esc(name)}</th>"]
            + [metric(value, measure, first=name, second=other) for other, value in zip(names, line)]
            for name, line in zip(names, comparison.similarity[measure])
        ]
        return f"<h3>Mean {esc(label)} of the filters' patch weights</h3>\n" + table(
            [""] + names, rows, numeric=list(range(1, len(names) + 1)), id=f"{measure}-table"
        )

    # -- the SAEs -------------------------------------------------------------------------------------------------

    def saes_section(self) -> str:
        if not self.run.saes:
            return note("No SAE in this run.")
        rows = [self.sae_row(sae) for sae in self.run.saes]
        figures = [
            self.links.picture(
                self.path, sae.curves, f"{sae.label}: loss and sparsity against steps (Figure 18)", css="wide"
            )
            for sae in self.run.saes
            if sae.folder is not None
        ]
        text = (
            "<p>Final validation metrics of each SAE. The compression factor is the mean number of non-zero "
            "input channels per sample divided by the mean number of active latents (L0).</p>"
        )
        return (
            text
            + table(
                [
                    "SAE",
                    "architecture",
                    "inputs",
                    "latents",
                    "steps",
                    "validation MSE",
                    "variance explained",
                    "L0",
                    "dead latents",
                    "dense latents",
                    "compression factor",
                    "from",
                ],
                rows,
                numeric=list(range(2, 11)),
                id="sae-table",
            )
            + figures_row(figures)
        )

    @staticmethod
    def sae_row(sae: SaeRun) -> list[str]:
        label, metrics = sae.label, sae.metrics
        params = f" {esc(', '.join(f'{k}={v}' for k, v in sae.params.items()))}" if sae.params else ""
        return [
            f"<td>{esc(label)}</td>",
            f"<td><code>{esc(shown(sae.architecture, '?'))}</code>{params}</td>",
            metric(sae.input_dim, "input-dim", "int", sae=label),
            metric(sae.latent_dim, "latent-dim", "int", sae=label),
            cell(sae.steps, "int"),
            metric(metrics.mse, "val-mse", sae=label),
            metric(metrics.fve, "fve", "pct", sae=label),
            metric(metrics.l0, "l0", sae=label),
            metric(metrics.dead_fraction, "dead-fraction", "pct", sae=label),
            metric(metrics.dense_fraction, "dense-fraction", "pct", sae=label),
            metric(metrics.compression, "compression", sae=label),
            f'<td class="muted">{esc(sae.metrics_source or "none")}</td>',
        ]

    def filter_saes_sections(self) -> list[tuple[str, str, str]]:
        """The SAEs trained per filter's store, for runs that have them."""
        if self.run.filter_saes is None:
            return []
        return [("filter-saes", "SAEs per filter", self.filter_saes_section(self.run.filter_saes))]

    def filter_saes_section(self, study: FilterSaes) -> str:
        smoothing = (
            f"smoothed by a 1-d Gaussian of sigma {esc(fmt(study.sigma))} logged points, the raw curves faint"
            if finite_number(study.sigma)
            else "not smoothed"
        )
        text = (
            "<p>One SAE of the same architecture and training per filter's store, each validated on the "
            f"validation split of the <code>{esc(study.validated_on)}</code> store (paper sec. 7.3-7.4). The "
            "training error is measured on each SAE's own store (Figure 10), where the paper expects a store with "
            "fewer background patches to be harder to reconstruct; the validation error on the common store is what "
            f"it compares (Figure 11). Curves {smoothing}.</p>"
        )
        base = study.final_val_mse(study.baseline)
        rows = [
            [
                f"<td>{esc(row.filter)}{' (baseline)' if row.filter == study.baseline else ''}</td>",
                cell(row.train_samples, "int"),
                cell(row.steps, "int"),
                metric(row.final_train_mse, "filter-sae-train-mse", filter=row.filter),
                metric(row.final_val_mse, "filter-sae-val-mse", filter=row.filter),
                metric(
                    None if row.filter == study.baseline else _difference(row.final_val_mse, base),
                    "filter-sae-val-difference",
                    "signed",
                    filter=row.filter,
                ),
                metric(row.below_baseline, "filter-sae-below-baseline", "pct", filter=row.filter),
            ]
            for row in study.filters
        ]
        headers = [
            "trained on",
            "training samples",
            "steps",
            "final training MSE (own store)",
            f"final validation MSE ({study.validated_on} store)",
            f"difference to {study.baseline}",
            f"logged steps below {study.baseline} (smoothed)",
        ]
        picture = self.links.picture(
            self.path,
            study.figure,
            f"training error per filter's store (Figure 10) and validation error on the {study.validated_on} "
            "store (Figure 11) against steps",
            css="wide",
        )
        return (
            text
            + self.filter_claim(study, base)
            + table(headers, rows, numeric=list(range(1, 7)), id="filter-saes-table")
            + figures_row([picture])
        )

    @staticmethod
    def filter_claim(study: FilterSaes, base: float | None) -> str:
        """Whether the paper's claim holds on this run's numbers: every SAE trained on a filtered store ends with
        a lower validation error on the common store than the one trained on the baseline (uniform) store."""
        filtered = [(row.filter, finite_number(row.final_val_mse)) for row in study.filters]
        filtered = [(label, value) for label, value in filtered if label != study.baseline]
        lower = [(label, value) for label, value in filtered if base is not None and value is not None and value < base]
        not_lower = [pair for pair in filtered if pair not in lower]
        reference = f"the SAE trained on the {study.baseline} store ({fmt(base)})"
        on = f"on the {study.validated_on} store"
        if base is None or not filtered:
            verdict, sentence = (
                "unknown",
                "The paper's claim cannot be checked on this run: it needs the final validation error of the SAE "
                f"trained on the {study.baseline} store and of at least one SAE trained on a filtered store.",
            )
        elif not not_lower:
            verdict, sentence = (
                "holds",
                f"The paper's claim holds on this run: {_trained_on(lower)} {_end(lower)} with a lower validation "
                f"error {on} than {reference}.",
            )
        else:
            verdict, sentence = (
                "does-not-hold",
                f"The paper's claim does not hold on this run: {_trained_on(not_lower)} {_do(not_lower)} not end with "
                f"a lower validation error {on} than {reference}"
                + (f"; {_trained_on(lower)} {_do(lower)}." if lower else "."),
            )
        return f'<p class="statement" id="filter-saes-claim" data-claim="{verdict}">{esc(sentence)}</p>'

    def sweep_section(self, sweep: Sweep | None) -> str:
        if sweep is None:
            return note("No sweep in this run, so no Pareto frontier of sparsity against reconstruction.")
        rows = [
            [
                f"<td>{esc(c.label)}</td>",
                f"<td><code>{esc(c.sae)}</code></td>",
                f"<td>{esc(c.group)}</td>",
                f"<td>{'yes' if c.on_frontier else ''}</td>",
                metric(c.l0, "sweep-l0", config=c.label),
                metric(c.fve, "sweep-fve", "pct", config=c.label),
                metric(c.mse, "sweep-mse", config=c.label),
                metric(c.dead_fraction, "sweep-dead-fraction", "pct", config=c.label),
                metric(c.compression, "sweep-compression", config=c.label),
                f"<td>{esc(c.failed)}</td>",
            ]
            for c in sweep.configs
        ]
        figures = [
            self.links.picture(
                self.path,
                sweep.pareto,
                "L0 against 1 - variance explained, frontier per architecture (Figure 16)",
                css="wide",
            ),
            self.links.picture(self.path, sweep.ablations, "latent-size and clip ablations (Figure 17)", css="wide"),
        ]
        text = (
            f"<p>{esc(fmt(len(rows), 'int'))} configurations trained side by side for "
            f"{esc(fmt(sweep.steps, 'int'))} steps (paper sec. 8.4).</p>"
        )
        return (
            text
            + figures_row(figures)
            + table(
                [
                    "configuration",
                    "SAE",
                    "group",
                    "on frontier",
                    "L0",
                    "variance explained",
                    "MSE",
                    "dead latents",
                    "compression factor",
                    "failed",
                ],
                rows,
                numeric=[4, 5, 6, 7, 8],
                id="sweep-table",
            )
        )

    def splice_section(self) -> str:
        evaluated = [(sae.label, sae.evaluation) for sae in self.run.saes if sae.evaluation is not None]
        if not evaluated:
            return note("No SAE was spliced into the model in this run.")
        rows = [self.splice_row(label, evaluation) for label, evaluation in evaluated]
        details = [
            self.ablation_list(label, evaluation.ablations) for label, evaluation in evaluated if evaluation.ablations
        ]
        text = (
            "<p>Top-1 accuracy of the model alone, with the layer replaced by the SAE's reconstruction, and with "
            "the layer zeroed; KL divergence of the class distributions from the model's, and the share of the "
            "zero-ablation KL the SAE recovers.</p>"
        )
        return (
            text
            + table(
                [
                    "SAE",
                    "images",
                    "top-1 alone",
                    "top-1 with SAE",
                    "top-1 layer zeroed",
                    "top-1 drop",
                    "same prediction",
                    "KL with SAE",
                    "KL layer zeroed",
                    "KL recovered",
                    "layer variance explained",
                    "layer L0",
                ],
                rows,
                numeric=list(range(1, 12)),
                id="splice-table",
            )
            + "".join(details)
        )

    @staticmethod
    def splice_row(label: str, e: SpliceEvaluation) -> list[str]:
        return [
            f"<td>{esc(label)}</td>",
            cell(e.images, "int"),
            metric(e.top1_model, "top1-model", "pct", sae=label),
            metric(e.top1_sae, "top1-sae", "pct", sae=label),
            metric(e.top1_zero, "top1-zero", "pct", sae=label),
            metric(e.top1_drop, "top1-drop", "pct", sae=label),
            metric(e.prediction_agreement, "prediction-agreement", "pct", sae=label),
            metric(e.kl_sae, "kl-sae", sae=label),
            metric(e.kl_zero_ablation, "kl-zero-ablation", sae=label),
            metric(e.kl_recovered, "kl-recovered", "pct", sae=label),
            metric(e.layer_fve, "layer-fve", "pct", sae=label),
            metric(e.layer_l0, "layer-l0", sae=label),
        ]

    def ablation_list(self, label: str, ablations: list[LatentAblation]) -> str:
        """The latents zeroed one at a time, linked to their pages when they have one."""
        group = self.run.groups.get(label)
        items = []
        for ablation in ablations:
            latent = ablation.latent
            name = esc(f"latent {latent}")
            if group is not None and isinstance(latent, int) and latent in group.all_units():
                name = f'<a href="{self.links.unit_url(self.path, group, latent)}">{name}</a>'
            items.append(
                f"{name}: active on {esc(fmt(ablation.images_active, 'int'))} images; "
                f"{esc(ablation_effect(ablation.most_lowered))}"
            )
        return f"<h3>{esc(label)}: latents zeroed one at a time</h3>" + compact_list(items)

    # -- the units ------------------------------------------------------------------------------------------------

    def selectivity_section(self) -> str:
        statistics = self.run.statistics
        if statistics is None:
            return note("No unit statistics in this run.")
        if not statistics.has_concepts:
            return note("The data has no concept labels, so no unit was scored for selectivity.")
        attributes: list[str] = []
        for group in self.run.groups.values():
            for attribute in group.summary.selective_by_attribute if group.summary else {}:
                if attribute not in attributes:
                    attributes.append(attribute)
        focus = "shape" if "shape" in attributes else None
        summarised = [g for g in self.run.groups.values() if g.summary]
        if not summarised:
            return note("unit statistics hold no group summaries")
        phrases = [self.selectivity_phrase(group, group.summary, focus) for group in summarised if group.summary]
        rows = [self.selectivity_row(group, group.summary, attributes) for group in summarised if group.summary]
        what = "one shape" if focus else "one concept"
        statement = (
            f'<p class="statement" id="selectivity-statement">Selective for {esc(what)}: '
            + "; ".join(phrases)
            + ".</p>"
        )
        explanation = (
            f"<p>A unit is selective for a concept value (e.g. shape=star) when that value is the only one, "
            f"across all attributes, whose AUROC (per-image maximum against the images showing the value) "
            f"reaches {esc(fmt(statistics.selective_auroc))}; dead units are never selective.</p>"
        )
        headers = ["group", "units", "dead", "selective (any)", "share"]
        for name in attributes:
            headers += [f"selective: {name}", "share"]
        return (
            statement + explanation + table(headers, rows, numeric=list(range(1, len(headers))), id="selectivity-table")
        )

    @staticmethod
    def selectivity_phrase(group: Group, summary: GroupSummary, focus: str | None) -> str:
        """E.g. '3 of 32 CNN channels (9.4 %)': the units selective for the focus attribute (or any)."""
        count = summary.selective_by_attribute.get(focus) if focus else summary.selective
        labels = {"group": group.label, "attribute": focus or "any"}
        return (
            f"{metric(count, 'selective', 'int', tag='span', **labels)} of "
            f"{metric(summary.units, 'units', 'int', tag='span', group=group.label)} {esc(group.title)} "
            f"({metric(_share(count, summary.units), 'selective-share', 'pct', tag='span', **labels)})"
        )

    @staticmethod
    def selectivity_row(group: Group, summary: GroupSummary, attributes: list[str]) -> list[str]:
        label = group.label
        row = [
            f"<td>{esc(group.title)}</td>",
            metric(summary.units, "units", "int", group=label),
            metric(summary.dead, "dead", "int", group=label),
            metric(summary.selective, "selective", "int", group=label, attribute="any"),
            metric(_share(summary.selective, summary.units), "selective-share", "pct", group=label, attribute="any"),
        ]
        for name in attributes:
            count = summary.selective_by_attribute.get(name)
            row += [
                metric(count, "selective", "int", group=label, attribute=name),
                metric(_share(count, summary.units), "selective-share", "pct", group=label, attribute=name),
            ]
        return row

    def gallery_section(self) -> str:
        """Per group, the units the run pictured: their picture, why each was chosen and its best concept."""
        groups = [group for group in self.run.groups.values() if group.visualised]
        if not groups:
            return note("No unit was pictured in this run.")
        parts = [
            "<p>Per group the run pictured the top units by share of the activation, the most selective units "
            "(highest concept AUROC) and units firing on the most images; the recipe's <code>[visualize]</code> "
            "says how many of each.</p>"
        ]
        for group in groups:
            # the pictures worth reading first; a flagged render (it failed to reach its target) after them
            ordered = sorted(group.visualised, key=lambda unit: bool(group.flags.get(unit)))
            cards = [self.gallery_card(group, unit) for unit in ordered]
            gallery = f'<div class="figures gallery" data-group="{esc(group.label)}">' + "".join(cards) + "</div>"
            parts.append(f"<h3>{esc(group.title)}</h3>" + gallery)
        return "\n".join(parts)

    def gallery_card(self, group: Group, unit: int) -> str:
        stats = group.units.get(unit)
        picture = group.thumbnail(unit) or next((f for _, found in group.figures_of(unit) for f in found), None)
        link = self.links.unit_url(self.path, group, unit)
        lines = [group.unit_title(unit)]
        reasons = group.reasons.get(unit, [])
        if stats is not None and stats.rank is not None:
            lines.append(f"rank {fmt(stats.rank, 'int')} by share")
        if stats is not None and stats.best is not None and stats.best.attribute:
            lines.append(f"{stats.best.attribute}={stats.best.value}, AUROC {fmt(stats.best.auroc)}")
        lines.append(", ".join(reasons) or "visualised")
        if picture is not None and picture.kind == "feature-viz" and picture.caption:
            lines.append(picture.caption.split(": ", 1)[-1])  # the render's score: its start and final activation
        flagged = group.flags.get(unit)
        if flagged:
            lines.append("flagged: the render failed")
        image = (
            f'<img src="{esc(self.links.image_url(self.path, picture.path))}" alt="{esc(lines[0])}" width="96" '
            'height="96">'
            if picture is not None
            else '<span class="muted">no picture</span>'
        )
        css = "small flagged" if flagged else "small"
        title = f' title="{esc("; ".join(flagged))}"' if flagged else ""
        return (
            f'<figure class="{css}" data-unit="{unit}" data-reasons="{esc(" ".join(reasons))}"{title}>'
            f'<a href="{link}">{image}</a><figcaption>'
            + "<br>".join(esc(line) for line in lines)
            + "</figcaption></figure>"
        )

    def units_section(self) -> str:
        parts = []
        for group in self.run.groups.values():
            visualised = (
                ", ".join(f'<a href="{self.links.unit_url(self.path, group, u)}">{u}</a>' for u in group.visualised)
                or "none"
            )
            parts.append(
                f"<h3>{esc(group.title)}</h3><p>{esc(fmt(len(group.all_units()), 'int'))} pages; "
                f"visualised: {visualised}.</p>"
            )
            for run in group.runs:
                text = f"<code>{esc(run.name)}</code> ({esc(run.folder)}): {esc(fmt(len(run.figures), 'int'))} figures"
                if run.summary:
                    text += f"; {esc(run.summary)}"
                parts.append(f"<p>{text}</p>")
                general = [f for f in run.figures if f.unit is None]
                if general:
                    parts.append(
                        figures_row([self.links.picture(self.path, f.path, f.caption, kind=f.kind) for f in general])
                    )
        if not parts:
            return note("No unit statistics and no visualizer runs in this run.")
        return "\n".join(parts)


def _trained_on(pairs: Sequence[tuple[str, float | None]]) -> str:
    """'the SAE trained on median (0.0123)' or 'the SAEs trained on median (0.0123) and max (0.0131)'."""
    named = [f"{label} ({fmt(value)})" for label, value in pairs]
    stores = " and ".join([", ".join(named[:-1]), named[-1]] if len(named) > 1 else named)
    return f"the SAE{'s' if len(pairs) > 1 else ''} trained on {stores}"


def _end(pairs: Sequence[Any]) -> str:
    return "ends" if len(pairs) == 1 else "end"


def _do(pairs: Sequence[Any]) -> str:
    return "does" if len(pairs) == 1 else "do"


def _difference(value: Any, reference: float | None) -> float | None:
    """``value - reference`` when both are finite numbers; otherwise None."""
    number = finite_number(value)
    return number - reference if number is not None and reference is not None else None


def _share(count: Any, units: Any) -> Any:
    """``count / units`` when both are numbers (and ``units`` is not zero); otherwise None."""
    return count / units if finite_number(count) is not None and finite_number(units) else None
