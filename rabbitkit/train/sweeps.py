"""Formatting of sweep results (the runs themselves are :func:`rabbitkit.train.api.sweep`)."""

SHOWN = ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "test_bpc")


def format_table(results):
    """One row per run: the swept values, the headline metrics and the run directory."""
    if not results:
        return "no runs"
    keys = list(results[0][0])
    metrics = [m for m in SHOWN if any(m in r.metrics for _, r in results)]
    header = keys + metrics + ["run directory"]
    rows = [header]
    for values, result in results:
        row = [repr(values[k]) for k in keys]
        row += [f"{result.metrics[m]:.4f}" if m in result.metrics else "-" for m in metrics]
        row.append(str(result.run_dir))
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)) for row in rows)
