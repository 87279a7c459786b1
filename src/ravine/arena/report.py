"""The comparison report: report.html (self-contained, figures embedded as PNG data),
results.csv and results.json, and a plain-language verdict that cites measured numbers."""

from __future__ import annotations

import base64
import datetime
import html
import math
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ravine.arena.results import (  # noqa: E402
    Summary,
    steps_to_target,
    summarize,
    write_csv,
    write_json,
)
from ravine.arena.tasks import get_task  # noqa: E402
from ravine.arena.tune import SweepResult  # noqa: E402

__all__ = ["Report", "choose_target_loss", "write_report"]


@dataclass
class Report:
    """Where the files went and what they say."""

    html_path: Path
    csv_path: Path
    json_path: Path
    figures: dict[str, Path]
    summaries: list[Summary]
    verdict: list[str]
    target_loss: float
    target_source: str
    rows: list[dict[str, Any]] = field(repr=False, default_factory=list)


def choose_target_loss(rows: Sequence[dict[str, Any]], given: float | None = None) -> tuple[float, str]:
    """The train loss that "steps to target" counts to, and where it came from: the given
    number, else the median over optimizers of their mean final train loss (tuned runs,
    else default runs), so about half of the optimizers reach it."""
    if given is not None:
        return float(given), "given"
    for phase in ("seed", "default"):
        per_label: dict[str, list[float]] = {}
        for row in rows:
            if row["phase"] == phase and row["status"] == "ok" and math.isfinite(row["final_train_loss"]):
                per_label.setdefault(row["label"], []).append(row["final_train_loss"])
        if per_label:
            means = [statistics.fmean(values) for values in per_label.values()]
            return float(statistics.median(means)), f"median final train loss over {phase == 'seed' and 'tuned' or 'default'} optimizers"
    return math.nan, "no finished runs"


def write_report(result: SweepResult, target_loss: float | None = None) -> Report:
    """Write report.html, results.csv, results.json and figures/*.png under ``result.config.out``."""
    config = result.config
    out = Path(config.out)
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    task = get_task(config.task)
    given = target_loss if target_loss is not None else task.target_loss
    target, target_source = choose_target_loss(result.rows, given)

    rows = []
    for row in result.rows:
        row = dict(row)
        steps = steps_to_target(row, target)
        row["target_loss"] = target
        row["steps_to_target"] = steps
        row["seconds_to_target"] = steps * row["time_per_step_s"] if steps is not None else None
        rows.append(row)
    summaries = summarize(rows, target, result.lr_at_grid_edge)
    order = {label: index for index, label in enumerate(config.optimizers)}
    summaries.sort(key=lambda s: (s.mode != "tuned", order.get(s.optimizer, 99)))
    colors = {label: plt.get_cmap("tab10")(index % 10) for index, label in enumerate(config.optimizers)}
    percent = task.metric_name == "accuracy"

    meta = {
        "task": task.name,
        "task_description": task.description,
        "metric": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "budget": config.budget,
        "epochs": config.epoch_count,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "schedule": config.schedule,
        "clip_norm": config.clip_norm,
        "seeds": config.seed_count,
        "search": "tpe" if config.trials else "grid",
        "trials": config.trials,
        "grid": result.search,
        "best_lr": result.best_lr,
        "mode": config.mode,
        "target_loss": target,
        "target_source": target_source,
        "storage": config.storage_url,
        "studies": result.studies,
        "executed_runs": result.executed,
        "reused_runs": result.reused,
        "jobs": config.jobs,
        "torch_threads": config.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {_cpu_count()} CPU cores",
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }

    figures = {
        "loss_vs_epoch": _plot_loss_curves(rows, config.optimizers, colors, figures_dir, task.name),
        "test_metric": _plot_test_metric(rows, config.optimizers, colors, figures_dir, task.metric_name, percent),
        "lr_sensitivity": _plot_sensitivity(rows, config.optimizers, colors, figures_dir, result.best_lr),
        "speed_memory": _plot_speed_memory(summaries, colors, figures_dir),
    }
    if any(s.mode == "default" for s in summaries) and any(s.mode == "tuned" for s in summaries):
        figures["tuned_vs_default"] = _plot_tuned_vs_default(summaries, colors, figures_dir, task.metric_name, percent)
    figures = {name: path for name, path in figures.items() if path is not None}

    verdict = _verdict(summaries, task, target, percent)
    csv_path = write_csv(rows, out / "results.csv")
    json_path = write_json(rows, out / "results.json", meta={**meta, "verdict": verdict})
    html_path = out / "report.html"
    html_path.write_text(_html(meta, summaries, verdict, figures, percent, task), encoding="utf-8")
    return Report(html_path, csv_path, json_path, figures, summaries, verdict, target, target_source, rows)


# ---------------------------------------------------------------------------------------
# numbers into words


def _format_metric(value: float, percent: bool) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{100 * value:.1f}%" if percent else f"{value:.4g}"


def _format_interval(interval: Any, percent: bool) -> str:
    if interval.n == 0:
        return "—"
    if percent:
        if not math.isfinite(interval.half_width):
            return f"{100 * interval.mean:.1f}% (n={interval.n})"
        return f"{100 * interval.mean:.1f}% ± {100 * interval.half_width:.1f}"
    return interval.format(digits=4)


def _format_bytes(count: float) -> str:
    if not math.isfinite(count):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


def _verdict(summaries: list[Summary], task: Any, target: float, percent: bool) -> list[str]:
    lines: list[str] = []
    metric = task.metric_name
    for mode in ("tuned", "default"):
        finished = [s for s in summaries if s.mode == mode and s.test_metric.n > 0]
        if finished:
            break
    else:
        return ["No run finished without diverging, so there is nothing to compare."]
    # Rankings use the optimizers whose every seed finished; the others are named apart.
    group = [s for s in finished if s.diverged == 0] or finished
    for s in summaries:
        if s.mode == mode and s.diverged:
            lines.append(
                f"{s.optimizer}: {s.diverged} of {s.runs} seeds diverged at lr {s.lr:.3g}"
                + (" (chosen on seed 0, so it sits at the edge of stability)" if mode == "tuned" else "")
                + (f"; its numbers rest on {s.runs - s.diverged} seed(s) and it is left out of the rankings."
                   if s not in group else ".")
            )
    mode_words = "with its learning rate tuned" if mode == "tuned" else "at default settings"
    best = max(group, key=lambda s: s.test_metric.mean if task.higher_is_better else -s.test_metric.mean)
    lines.append(
        f"Best held-out {metric} {mode_words}: {best.optimizer} with "
        f"{_format_interval(best.test_metric, percent)} (mean ± 95% interval over {best.test_metric.n} seeds, "
        f"lr {best.lr:.3g})."
    )
    ties = [
        s for s in group
        if s is not best and math.isfinite(best.test_metric.half_width) and math.isfinite(s.test_metric.half_width)
        and s.test_metric.high >= best.test_metric.low and s.test_metric.low <= best.test_metric.high
    ]
    if ties:
        lines.append(
            "Its interval overlaps those of "
            + ", ".join(f"{s.optimizer} ({_format_interval(s.test_metric, percent)})" for s in ties)
            + ": with these seeds the data cannot rank them."
        )
    worst = min(group, key=lambda s: s.test_metric.mean if task.higher_is_better else -s.test_metric.mean)
    if worst is not best:
        lines.append(f"Weakest: {worst.optimizer} with {_format_interval(worst.test_metric, percent)}.")
    lowest = min(group, key=lambda s: s.final_train_loss.mean)
    lines.append(
        f"Lowest final train loss: {lowest.optimizer} ({lowest.final_train_loss.format(digits=3)})"
        + ("." if lowest is best else f", although {best.optimizer} generalizes best.")
    )
    reached = [s for s in group if s.steps_to_target is not None and s.reached_target == s.runs]
    if math.isfinite(target) and reached:
        fastest = min(reached, key=lambda s: s.seconds_to_target)
        missing = [s.optimizer for s in group if s.steps_to_target is None or s.reached_target < s.runs]
        text = (
            f"Fastest to train loss {target:.3g}: {fastest.optimizer}, in {fastest.steps_to_target:.0f} steps "
            f"({fastest.seconds_to_target:.3g} s of training)"
        )
        slowest = max(reached, key=lambda s: s.seconds_to_target)
        if slowest is not fastest:
            text += f"; {slowest.optimizer} needed {slowest.steps_to_target:.0f} steps ({slowest.seconds_to_target:.3g} s)"
        text += "."
        if missing:
            text += f" Not reached by every seed of: {', '.join(missing)}."
        lines.append(text)
    timed = [s for s in group if math.isfinite(s.optimizer_step_time_s)]
    if timed:
        cheap = min(timed, key=lambda s: s.optimizer_step_time_s)
        dear = max(timed, key=lambda s: s.optimizer_step_time_s)
        lines.append(
            f"Optimizer step: {cheap.optimizer} {1e3 * cheap.optimizer_step_time_s:.3f} ms, "
            f"{dear.optimizer} {1e3 * dear.optimizer_step_time_s:.3f} ms "
            f"(whole training step {1e3 * cheap.time_per_step_s:.2f} vs {1e3 * dear.time_per_step_s:.2f} ms)."
        )
        light = min(group, key=lambda s: s.state_bytes)
        heavy = max(group, key=lambda s: s.state_bytes)
        lines.append(
            f"Optimizer state: {light.optimizer} keeps {_format_bytes(light.state_bytes)}, "
            f"{heavy.optimizer} {_format_bytes(heavy.state_bytes)}."
        )
        if light is not best and light.state_bytes < best.state_bytes:
            gap = best.test_metric.mean - light.test_metric.mean
            lost = f"{100 * abs(gap):.1f} points" if percent else f"{abs(gap):.3g}"
            lines.append(
                f"Memory-bound choice: {light.optimizer} gives up {lost} of {metric} against "
                f"{best.optimizer} and saves {_format_bytes(best.state_bytes - light.state_bytes)} of state "
                "(state grows with the parameter count; these are this model's bytes)."
            )
    tuned = {s.optimizer: s for s in summaries if s.mode == "tuned" and s.test_metric.n}
    default = {s.optimizer: s for s in summaries if s.mode == "default"}
    gaps = []
    for name, tuned_summary in tuned.items():
        if name in default:
            base = default[name]
            if base.test_metric.n == 0:
                gaps.append((math.inf, name, "every default run diverged"))
                continue
            difference = tuned_summary.test_metric.mean - base.test_metric.mean
            if not task.higher_is_better:
                difference = -difference
            gaps.append((difference, name, ""))
    if gaps:
        gaps.sort(reverse=True)
        largest = gaps[0]
        if largest[2]:
            lines.append(f"Tuning matters most for {largest[1]}: {largest[2]}.")
        else:
            lines.append(
                f"Tuning the learning rate against the defaults: largest gain for {largest[1]} "
                f"({_signed(largest[0], percent)} {metric}), smallest for {gaps[-1][1]} "
                f"({_signed(gaps[-1][0], percent)})."
            )
    edge = [s.optimizer for s in summaries if s.lr_at_grid_edge]
    if edge:
        lines.append(
            f"Best learning rate at the edge of the searched range for: {', '.join(edge)}; "
            "a wider search (--budget full or --trials N) may find better."
        )
    return lines


def _signed(value: float, percent: bool) -> str:
    if abs(value) < 1e-12:
        value = 0.0  # no "-0"
    if percent:
        return f"{100 * value:+.1f} points"
    return f"{value:+.3g}"


# ---------------------------------------------------------------------------------------
# figures


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plain_log_ticks(axis: Any) -> None:
    """Tick labels 0.3, 1, 3 rather than 3x10^-1 on a log axis."""
    def label(value: float, _position: int) -> str:
        leading = f"{value:.0e}"[0]
        return f"{value:g}" if leading in "1235" else ""  # 2, 3 and 5 between the decades

    axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(label))
    axis.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(label))


def _epoch_means(row: dict[str, Any]) -> list[float]:
    losses = row["train_loss"][: row["steps"]]
    size = row["steps_per_epoch"]
    return [statistics.fmean(losses[i : i + size]) for i in range(0, len(losses), size) if losses[i : i + size]]


def _mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    length = max(len(curve) for curve in curves)
    mean, low, high = [], [], []
    for index in range(length):
        values = [curve[index] for curve in curves if index < len(curve) and math.isfinite(curve[index])]
        if not values:
            break
        mean.append(statistics.fmean(values))
        low.append(min(values))
        high.append(max(values))
    return mean, low, high


def _plot_loss_curves(rows, labels, colors, folder: Path, task_name: str) -> Path | None:
    panels = [(phase, title) for phase, title in (("seed", "tuned learning rate"), ("default", "default settings"))
              if any(row["phase"] == phase for row in rows)]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), sharey=True, squeeze=False)
    lows = []
    for axis, (phase, title) in zip(axes[0], panels):
        for label in labels:
            runs = [row for row in rows if row["phase"] == phase and row["label"] == label and row["status"] == "ok"]
            curves = [_epoch_means(row) for row in runs]
            curves = [curve for curve in curves if curve]
            if not curves:
                continue
            mean, low, high = _mean_curve(curves)
            epochs = list(range(1, len(mean) + 1))
            lr = runs[0]["lr"]
            axis.plot(epochs, mean, marker="o", markersize=3, color=colors[label], label=f"{label} (lr {lr:.2g})")
            axis.fill_between(epochs, low, high, color=colors[label], alpha=0.15, linewidth=0)
            lows.extend(value for value in mean if value > 0)
        axis.set_title(f"Train loss, {title}")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("train loss (mean over the epoch)")
    if lows and max(lows) / max(min(lows), 1e-12) > 20:
        axes[0][0].set_yscale("log")
        _plain_log_ticks(axes[0][0])
    figure.suptitle(f"{task_name}: loss against epoch (mean over seeds that did not diverge; band: min–max)",
                    fontsize=10)
    return _save(figure, folder / "loss_vs_epoch.png")


def _plot_test_metric(rows, labels, colors, folder: Path, metric: str, percent: bool) -> Path | None:
    figure, axis = plt.subplots(figsize=(7.5, 4.4))
    drawn = False
    scale = 100.0 if percent else 1.0
    for phase, style, suffix in (("seed", "-", "tuned"), ("default", "--", "default")):
        for label in labels:
            runs = [row for row in rows if row["phase"] == phase and row["label"] == label and row["status"] == "ok"]
            curves = [[scale * value for value in row["test_metric"]] for row in runs if row["test_metric"]]
            if not curves:
                continue
            mean, low, high = _mean_curve(curves)
            epochs = runs[0]["eval_epochs"][: len(mean)]
            axis.plot(epochs, mean, style, color=colors[label], label=f"{label}, {suffix}")
            if phase == "seed":
                axis.fill_between(epochs, low[: len(epochs)], high[: len(epochs)], color=colors[label], alpha=0.12, linewidth=0)
            drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"held-out {metric}" + (" (%)" if percent else ""))
    axis.set_title(f"Held-out {metric} per evaluation (solid: tuned lr, dashed: defaults)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    return _save(figure, folder / "test_metric.png")


def _plot_sensitivity(rows, labels, colors, folder: Path, best_lr: dict[str, float]) -> Path | None:
    search = [row for row in rows if row["phase"] == "search"]
    if not search:
        return None
    figure, axis = plt.subplots(figsize=(7.5, 4.4))
    finite = [row["final_train_loss"] for row in search if row["status"] == "ok" and math.isfinite(row["final_train_loss"])]
    ceiling = max(finite) * 1.15 if finite else 1.0
    floor = min(finite) if finite else 0.1
    for label in labels:
        runs = sorted((row for row in search if row["label"] == label), key=lambda row: row["lr"])
        if not runs:
            continue
        ok = [row for row in runs if row["status"] == "ok" and math.isfinite(row["final_train_loss"])]
        axis.plot([row["lr"] for row in ok], [row["final_train_loss"] for row in ok], marker="o",
                  color=colors[label], label=label)
        bad = [row for row in runs if row not in ok]
        if bad:
            axis.scatter([row["lr"] for row in bad], [ceiling] * len(bad), marker="x", s=60, color=colors[label])
        if label in best_lr:
            best = [row for row in ok if math.isclose(row["lr"], best_lr[label], rel_tol=1e-6)]
            if best:
                axis.scatter([best[0]["lr"]], [best[0]["final_train_loss"]], s=160, facecolors="none",
                             edgecolors=colors[label], linewidths=1.5)
    axis.set_xscale("log")
    if finite and ceiling / max(floor, 1e-12) > 20:
        axis.set_yscale("log")
        _plain_log_ticks(axis)
    axis.axhline(ceiling, color="grey", linewidth=0.5, linestyle=":")
    axis.text(0.01, 0.97, "x on the dotted line: diverged;  circle: chosen lr", transform=axis.transAxes,
              fontsize=8, va="top")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("final train loss (seed 0)")
    axis.set_title("Learning-rate sensitivity")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, loc="center right")
    return _save(figure, folder / "lr_sensitivity.png")


def _plot_speed_memory(summaries: list[Summary], colors, folder: Path) -> Path | None:
    group = [s for s in summaries if s.mode == "tuned"] or [s for s in summaries if s.mode == "default"]
    if not group:
        return None
    names = [s.optimizer for s in group]
    positions = list(range(len(group)))
    figure, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(group) + 2.2), sharey=True)
    step = [1e3 * s.optimizer_step_time_s for s in group]
    rest = [1e3 * (s.time_per_step_s - s.optimizer_step_time_s) for s in group]
    bar_colors = [colors[name] for name in names]
    axes[0].barh(positions, rest, color="lightgrey", label="forward + backward")
    axes[0].barh(positions, step, left=rest, color=bar_colors, label="optimizer.step()")
    axes[0].set_xlabel("ms per training step (median over runs)")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].barh(positions, [s.state_bytes / 1024 for s in group], color=bar_colors)
    axes[1].set_xlabel("optimizer state (KiB, exact)")
    axes[2].barh(positions, [s.peak_memory_bytes / 2**20 for s in group], color=bar_colors)
    axes[2].set_xlabel("peak RSS rise during a run (MiB)")
    if not any(s.peak_memory_bytes for s in group):
        axes[2].text(0.5, 0.5, "no rise above the\nstart-of-run level", ha="center", va="center",
                     transform=axes[2].transAxes, color="grey")
    axes[0].set_yticks(positions, names)
    axes[0].invert_yaxis()
    for axis in axes:
        axis.grid(alpha=0.3, axis="x")
    figure.suptitle("Speed and memory", fontsize=10)
    return _save(figure, folder / "speed_memory.png")


def _plot_tuned_vs_default(summaries, colors, folder: Path, metric: str, percent: bool) -> Path | None:
    tuned = {s.optimizer: s for s in summaries if s.mode == "tuned"}
    default = {s.optimizer: s for s in summaries if s.mode == "default"}
    names = [name for name in tuned if name in default]
    if not names:
        return None
    scale = 100.0 if percent else 1.0
    figure, axis = plt.subplots(figsize=(7.5, 4.0))
    width = 0.38
    for offset, source, hatch, label in ((-width / 2, tuned, None, "tuned lr"), (width / 2, default, "//", "defaults")):
        values = [scale * source[name].test_metric.mean if source[name].test_metric.n else 0.0 for name in names]
        errors = [scale * source[name].test_metric.half_width if source[name].test_metric.n > 1 else 0.0 for name in names]
        axis.bar([i + offset for i in range(len(names))], values, width, yerr=errors, capsize=3,
                 color=[colors[name] for name in names], hatch=hatch, edgecolor="black", linewidth=0.5,
                 alpha=1.0 if hatch is None else 0.55, label=label)
    axis.set_xticks(range(len(names)), names, rotation=20)
    axis.set_ylabel(f"held-out {metric}" + (" (%)" if percent else ""))
    axis.set_title("Tuned learning rate vs defaults (bars: mean, whiskers: 95% interval)")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    return _save(figure, folder / "tuned_vs_default.png")


# ---------------------------------------------------------------------------------------
# HTML


_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.6em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.meta { color: #555; font-size: 0.9em; } img { max-width: 100%; border: 1px solid #eee; }
ul.verdict li { margin-bottom: 0.35em; } .note { color: #666; font-size: 0.85em; }
"""


def _embed(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(summaries: list[Summary], mode: str, percent: bool, metric: str, tuned: dict[str, Summary]) -> str:
    group = [s for s in summaries if s.mode == mode]
    if not group:
        return ""
    heads = ["optimizer", "lr", "runs (diverged)", "final train loss", f"test {metric}", "steps to target",
             "seconds to target", "ms / step", "ms / optimizer step", "state memory", "peak RSS rise"]
    if mode == "default" and tuned:
        heads.append(f"tuning gain ({metric})")
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(head)}</th>" for head in heads) + "</tr>"]
    for s in group:
        lr = f"{s.lr:.3g}" + (" (grid edge)" if s.lr_at_grid_edge else "")
        reached = "—" if s.steps_to_target is None else f"{s.steps_to_target:.0f} ({s.reached_target}/{s.runs})"
        seconds = "—" if s.seconds_to_target is None else f"{s.seconds_to_target:.3g}"
        cells = [s.optimizer, lr, f"{s.runs} ({s.diverged})", s.final_train_loss.format(digits=4),
                 _format_interval(s.test_metric, percent), reached, seconds,
                 f"{1e3 * s.time_per_step_s:.2f}", f"{1e3 * s.optimizer_step_time_s:.3f}",
                 _format_bytes(s.state_bytes), _format_bytes(s.peak_memory_bytes)]
        if mode == "default" and tuned:
            other = tuned.get(s.optimizer)
            if other is None or other.test_metric.n == 0 or s.test_metric.n == 0:
                cells.append("—")
            else:
                cells.append(_signed(other.test_metric.mean - s.test_metric.mean, percent))
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _html(meta, summaries, verdict, figures, percent, task) -> str:
    metric = task.metric_name
    tuned = {s.optimizer: s for s in summaries if s.mode == "tuned"}
    budget = (f"{meta['epochs']} epochs" if meta["epochs"] else f"{meta['steps']} steps") + \
        f", batch size {meta['batch_size']}, schedule {meta['schedule']}" + \
        (f", gradient clipping at norm {meta['clip_norm']}" if meta["clip_norm"] else "")
    search = (f"Optuna TPE, {meta['trials']} trials" if meta["search"] == "tpe"
              else "log grid: " + "; ".join(f"{name} {', '.join(f'{lr:.3g}' for lr in lrs)}"
                                            for name, lrs in meta["grid"].items()))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>ravine compare: {html.escape(meta['task'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>ravine compare: {html.escape(meta['task'])}</h1>",
        f"<p class='meta'>{html.escape(meta['task_description'])}<br>"
        f"Budget {html.escape(meta['budget'])}: {html.escape(budget)}; {meta['seeds']} seeds per setting; "
        f"learning-rate search: {html.escape(search)}.<br>"
        f"{html.escape(meta['machine'])}, torch {html.escape(meta['torch'])}, {meta['torch_threads']} thread(s) per run, "
        f"{meta['jobs']} run(s) at a time; {meta['executed_runs']} runs executed now, {meta['reused_runs']} "
        f"read back from <code>{html.escape(meta['storage'])}</code>; {html.escape(meta['created'])}.</p>",
        "<h2>Verdict</h2><ul class='verdict'>" + "".join(f"<li>{html.escape(line)}</li>" for line in verdict) + "</ul>",
    ]
    if tuned:
        parts.append("<h2>Tuned learning rate</h2>")
        parts.append(_table(summaries, "tuned", percent, metric, tuned))
    if any(s.mode == "default" for s in summaries):
        parts.append("<h2>Defaults (the seed texts' advice)</h2>")
        parts.append(_table(summaries, "default", percent, metric, tuned))
    parts.append(
        "<p class='note'>Intervals: mean ± 95% Student-t interval over seeds. Final train loss: mean "
        "over the last epoch's steps. Steps / seconds to target: first step at which the trailing "
        f"one-epoch mean of the train loss is at or below {meta['target_loss']:.4g} "
        f"({html.escape(meta['target_source'])}), mean over the seeds that reached it; seconds "
        "count training steps only, not evaluation. State memory: bytes of the tensors in "
        "optimizer.state_dict() (exact). Peak RSS rise: how far the process's resident memory "
        "rose above its level at the start of a run (OS counter; coarse for small models).</p>"
    )
    captions = {
        "loss_vs_epoch": "Loss against epoch for every optimizer",
        "test_metric": f"Held-out {metric}",
        "lr_sensitivity": "Final train loss against learning rate",
        "speed_memory": "Speed and memory",
        "tuned_vs_default": "Tuned vs default",
    }
    for name, path in figures.items():
        parts.append(f"<h2>{html.escape(captions.get(name, name))}</h2>{_embed(path)}")
    parts.append(
        "<p class='note'>Also written: results.csv and results.json (one row per run, with the per-step "
        "train loss and per-evaluation test numbers).</p></body></html>"
    )
    return "\n".join(parts)


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1
