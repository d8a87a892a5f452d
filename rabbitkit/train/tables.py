"""Plain-text and CSV tables shared by ``rabbit runs``, ``rabbit compare`` and sweeps."""
import csv
import io


def aligned(rows):
    """Rows of strings (the first is the header) as left-aligned columns separated by two spaces."""
    if not rows:
        return ""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip() for row in rows)


def csv_text(header, records):
    """``records`` (dicts) as CSV with the ``header`` columns; floats in full precision."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in header})
    return buffer.getvalue()


def number(value, digits=4):
    """A metric for a table cell: '-' when missing, else ``digits`` decimals (or .4g when tiny/huge)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if 1e-3 <= abs(value) < 1e6 or value == 0 else f"{value:.4g}"
    return str(value)
