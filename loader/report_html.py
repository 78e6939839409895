"""report.html and the notebook view of a Report: self-contained HTML, every source text escaped.

No scripts and no network: the page is mailed around and opened offline. Every
value that comes from the source or the target (ids, reasons, paths, stream
keys) goes through `_e` (html.escape), so a `<script>` in an external_id stays
text.
"""

from __future__ import annotations

import html
from datetime import datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from loader.report import OUTCOMES, format_major

if TYPE_CHECKING:
    from loader.report import Report

FAILED_ROWS_SHOWN = 200

_LABELS = {"total": "Total", "successful": "Successful", "failed": "Failed", "skipped": "Skipped"}
_FAILED_COLUMNS = (
    "source_file", "source_row", "data_stream_key", "external_id", "date", "amount", "currency",
    "reason_code", "reason", "bulk_request_id",
)

# Every selector sits under .loader-report so that the notebook view does not
# restyle the rest of the notebook.
_CSS = """
.loader-report{--ok:#1a7f37;--bad:#cf222e;--skip:#9a6700;--muted:#57606a;--line:#d0d7de;
  font:14px/1.45 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1f2328;max-width:1200px;margin:0 auto;padding:16px}
.loader-report h1{font-size:22px;margin:0 0 4px}
.loader-report h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid var(--line);padding-bottom:4px}
.loader-report .meta{color:var(--muted);display:flex;flex-wrap:wrap;gap:4px 20px}
.loader-report .meta b{color:#1f2328;font-weight:600}
.loader-report .badge{display:inline-block;padding:1px 8px;border-radius:10px;background:#ddf4ff;color:#0969da;font-weight:600}
.loader-report .error{background:#ffebe9;border:1px solid var(--bad);color:var(--bad);padding:8px 12px;border-radius:6px;margin:12px 0}
.loader-report .cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.loader-report .card{flex:1 1 160px;border:1px solid var(--line);border-top:4px solid var(--muted);border-radius:6px;padding:8px 12px}
.loader-report .card .n{font-size:32px;font-weight:700;font-variant-numeric:tabular-nums}
.loader-report .card .label{color:var(--muted);text-transform:uppercase;font-size:12px;letter-spacing:.05em}
.loader-report .successful{border-top-color:var(--ok)}.loader-report .successful .n,.loader-report td.successful{color:var(--ok)}
.loader-report .failed{border-top-color:var(--bad)}.loader-report .failed .n,.loader-report td.failed{color:var(--bad)}
.loader-report .skipped{border-top-color:var(--skip)}.loader-report .skipped .n,.loader-report td.skipped{color:var(--skip)}
.loader-report table{border-collapse:collapse;margin:4px 0;font-variant-numeric:tabular-nums}
.loader-report th,.loader-report td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
.loader-report th{background:#f6f8fa;font-weight:600}
.loader-report td.num{text-align:right;white-space:nowrap}
.loader-report .minor{display:block;color:var(--muted);font-size:11px}
.loader-report .null{color:var(--muted);font-style:italic}
.loader-report .scroll{overflow-x:auto}
.loader-report .note{color:var(--muted)}
"""


def render_page(report: Report) -> str:
    """The whole report.html of a finished run."""
    s = report.summary
    title = f"{s['pipeline']} · {s['run_id']}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>",
        '<body><div class="loader-report">',
        _header(s),
        _cards(s["totals"]),
        "<h2>Control totals</h2>",
        '<p class="note">Rows and amounts per stream and currency: the total of each line is what the source holds. '
        "Amounts in major units, with the exact integer minor units below.</p>",
        _control_totals(s["by_stream"]),
        "<h2>Reasons</h2>",
        _reasons(s["reasons"]),
        _failed_rows(report),
        _source(s),
        "</div></body></html>",
    ]
    return "\n".join(parts) + "\n"


def render_fragment(report: Report) -> str:
    """The compact notebook view: totals, control totals, reason codes and the top 5 failure reasons."""
    s = report.summary
    parts = [
        f"<style>{_CSS}</style>",
        '<div class="loader-report">',
        f"<b>{_e(s['pipeline'])}</b> run <code>{_e(s['run_id'])}</code>"
        + (' <span class="badge">dry run</span>' if s.get("dry_run") else ""),
    ]
    if s.get("error"):
        parts.append(f'<div class="error">Aborted: {_e(s["error"])}</div>')
    parts += [
        _cards(s["totals"]),
        _control_totals(s["by_stream"]),
        "<b>Outcomes by reason code</b>" if s["reasons"] else "",
        _reasons(s["reasons"]) if s["reasons"] else "",
        _top_failures(report),
        f'<p class="note">Rows: <code>{_e(report.rows_path)}</code></p>',
        "</div>",
    ]
    return "\n".join(p for p in parts if p)


def _top_failures(report: Report, top: int = 5) -> str:
    """The most common failure texts (not just codes), read from rows.parquet."""
    if not report.summary["totals"]["failed"] or not report.rows_path.exists():
        return ""
    counts = (
        pl.scan_parquet(report.rows_path)
        .filter(pl.col("outcome") == "failed")
        .group_by("reason_code", "reason")
        .len("rows")
        .sort("rows", "reason", descending=[True, False])
        .head(top)
        .collect()
    )
    lines = "".join(
        f"<tr><td>{_e(code)}</td><td>{_e(reason)}</td><td class='num'>{rows:,}</td></tr>"
        for code, reason, rows in counts.iter_rows()
    )
    return (f"<b>Top failure reasons</b><table><tr><th>Code</th><th>Reason</th><th>Rows</th></tr>"
            f"{lines}</table>")


def _header(s: dict) -> str:
    meta = [
        ("Run", s["run_id"]),
        ("Started", s["started_at"]),
        ("Finished", s["finished_at"]),
        ("Duration", _duration(s["started_at"], s["finished_at"])),
        ("Target", ", ".join(f"{k}: {v}" for k, v in s["target"].items()) or "—"),
    ]
    items = "".join(f"<span>{_e(label)} <b>{_e(value)}</b></span>" for label, value in meta)
    dry = ' <span class="badge">dry run: nothing was sent</span>' if s.get("dry_run") else ""
    error = f'<div class="error"><b>Aborted:</b> {_e(s["error"])}</div>' if s.get("error") else ""
    return f'<h1>{_e(s["pipeline"])}{dry}</h1><div class="meta">{items}</div>{error}'


def _cards(totals: dict) -> str:
    total = totals["total"]
    cards = []
    for key in ("total", *OUTCOMES):
        share = f" · {totals[key] * 100 // total}%" if total and key != "total" else ""
        cards.append(
            f'<div class="card {key}"><div class="label">{_LABELS[key]}{share}</div>'
            f'<div class="n">{totals[key]:,}</div></div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _control_totals(by_stream: list[dict]) -> str:
    if not by_stream:
        return '<p class="note">No rows.</p>'
    lines: dict[tuple, dict[str, tuple[int, int]]] = {}
    for entry in by_stream:
        key = (entry["data_stream_key"], entry["currency"])
        lines.setdefault(key, {})[entry["outcome"]] = (entry["rows"], entry["amount"])
    groups = (*OUTCOMES, "total")
    head = "".join(f'<th colspan="2" class="{g}">{_LABELS[g]}</th>' for g in groups)
    sub = "<th>rows</th><th>amount</th>" * len(groups)
    body = []
    for (stream, currency), outcomes in lines.items():
        outcomes = dict(outcomes)
        outcomes["total"] = (sum(r for r, _ in outcomes.values()), sum(a for _, a in outcomes.values()))
        cells = [_cell(stream), _cell(currency)]
        for g in groups:
            rows, amount = outcomes.get(g, (0, 0))
            cls = f"num {g}" if g != "total" and rows else "num"
            cells.append(f'<td class="{cls}">{rows:,}</td><td class="num">{_amount(amount, currency)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<div class="scroll"><table><thead>'
        f'<tr><th rowspan="2">Stream</th><th rowspan="2">Currency</th>{head}</tr><tr>{sub}</tr>'
        f'</thead><tbody>{"".join(body)}</tbody></table></div>'
    )


def _reasons(reasons: list[dict]) -> str:
    if not reasons:
        return '<p class="note">No rows.</p>'
    body = "".join(
        f'<tr><td class="{_e(r["outcome"])}">{_e(r["outcome"])}</td><td>{_e(r["reason_code"])}</td>'
        f'<td class="num">{r["rows"]:,}</td></tr>'
        for r in reasons
    )
    return f"<table><thead><tr><th>Outcome</th><th>Reason</th><th>Rows</th></tr></thead><tbody>{body}</tbody></table>"


def _failed_rows(report: Report) -> str:
    failed = report.summary["totals"]["failed"]
    if not failed:
        return ""
    # Only the first rows are read: a run may have millions of failures.
    rows = (
        pl.scan_parquet(report.rows_path)
        .filter(pl.col("outcome") == "failed")
        .select(_FAILED_COLUMNS)
        .head(FAILED_ROWS_SHOWN)
        .collect()
    )
    shown = f"the first {rows.height:,} of {failed:,}" if rows.height < failed else f"all {failed:,}"
    head = "".join(f"<th>{_e(c)}</th>" for c in _FAILED_COLUMNS)
    body = []
    for row in rows.iter_rows(named=True):
        cells = []
        for column in _FAILED_COLUMNS:
            value = row[column]
            if column == "amount" and value is not None:
                cells.append(f'<td class="num">{_amount(value, row["currency"])}</td>')
            elif column in ("source_row", "bulk_request_id") and value is not None:
                cells.append(f'<td class="num">{value}</td>')
            else:
                cells.append(_cell(value))
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<h2>Failed rows</h2><p class=\"note\">Showing {shown} failed rows; all of them are in "
        f"<code>{_e(report.rows_path.name)}</code> (outcome = 'failed').</p>"
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )


def _source(s: dict) -> str:
    files = (s.get("source") or {}).get("files") or []
    parts = ["<h2>Source</h2>"]
    if files:
        body = "".join(
            f'<tr><td>{_e(f.get("path"))}</td><td class="num">{_number(f.get("rows"))}</td></tr>' for f in files
        )
        parts.append(f"<table><thead><tr><th>File</th><th>Rows</th></tr></thead><tbody>{body}</tbody></table>")
    requests = s.get("bulk_requests") or []
    listed = ", ".join(str(i) for i in requests[:20]) + (", …" if len(requests) > 20 else "")
    parts.append(f'<p class="note">{len(requests):,} bulk requests{": " + listed if requests else ""}</p>')
    return "".join(parts)


def _amount(amount: int, currency: str | None) -> str:
    major = format_major(amount, currency)
    if major is None:  # no ISO 4217 exponent: the minor units are the only exact figure
        return f'{amount}<span class="minor">minor units</span>'
    return f'{major}<span class="minor">{amount}</span>'


def _cell(value: Any) -> str:
    if value is None:
        return '<td class="null">null</td>'
    return f"<td>{_e(value)}</td>"


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else _e(value)


def _duration(started: str, finished: str) -> str:
    try:
        seconds = (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
    except (TypeError, ValueError):
        return "—"
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {seconds:04.1f}s" if hours else f"{minutes}m {seconds:04.1f}s"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
