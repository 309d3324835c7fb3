"""The retention pages as HTML, rendered on the server: inline CSS and SVG, no script, nothing fetched from elsewhere,
so the same functions make the live pages and the one-file report. Every value from data is escaped."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

from streamproc.domain.alert_board import RISK_ORDER
from streamproc.settings import VALUE_TIERS

PAGES = (("at-risk", "At risk", "/ui/"), ("customer", "Customer", "/ui/customer"),
         ("segments", "Segments", "/ui/segments"), ("uplift", "Uplift", "/ui/uplift"),
         ("health", "Health", "/ui/health"))
# the customer's features the page lists, in this order (the lookup API has them all)
CUSTOMER_FEATURES = ("lifecycle_stage", "value_tier", "recency_days", "frequency", "monetary_total", "monetary_avg",
                     "clv", "spend_30d", "spend_90d", "purchases_30d", "sessions_30d", "clicks_30d",
                     "conversion_rate", "cart_abandonment_rate", "top_categories", "tenure_days")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2433;background:#f6f7f9}
header{background:#1d2433;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}
header b{font-size:18px}header a{color:#c9d1e0;text-decoration:none}header a.on{color:#fff;font-weight:600}
main{padding:16px 24px;max-width:1280px}h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:22px 0 8px}
.note{color:#5b6577;font-size:13px}.empty{padding:24px;background:#fff;border:1px dashed #c3c9d4;color:#5b6577}
table{border-collapse:collapse;background:#fff;width:100%;font-size:14px}
th,td{border-bottom:1px solid #e3e6eb;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.tiles{display:flex;flex-wrap:wrap;gap:12px}.tile{background:#fff;border:1px solid #e3e6eb;padding:10px 14px;
min-width:150px}.tile .v{font-size:22px;font-weight:600}.tile .k{font-size:12px;color:#5b6577}
.risk-critical{color:#b00020;font-weight:600}.risk-high{color:#c75000;font-weight:600}.risk-medium{color:#8a6d00}
.control{background:#eef0f4;padding:1px 6px;border-radius:8px;font-size:12px}
form.filters{display:flex;gap:10px;align-items:end;margin:10px 0}label{font-size:12px;color:#5b6577}
select,input{display:block;padding:4px 6px;font-size:14px}button{padding:5px 12px;font-size:14px}
ul.reasons{margin:0;padding-left:16px}svg{background:#fff;border:1px solid #e3e6eb}
"""


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * float(value):.0f} %"
    if kind == "money":
        return f"{float(value):,.2f}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def day(ms: int | float | None) -> str:
    return "–" if not ms else datetime.fromtimestamp(float(ms) / 1000, UTC).strftime("%Y-%m-%d")


def document(title: str, body: str, active: str | None = None, nav: bool = True) -> str:
    links = "".join(f'<a href="{href}" class="{"on" if key == active else ""}" id="nav-{key}">{label}</a>'
                    for key, label, href in PAGES) if nav else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)} · streamproc'
            f'</title><meta name="referrer" content="no-referrer"><style>{CSS}</style></head><body>'
            f"<header><b>streamproc · retention</b>{links}</header><main>{body}</main></body></html>")


def empty(message: str) -> str:
    return f'<div class="empty">{escape(message)}</div>'


def table(headers: Sequence[str], rows: Iterable[str], table_id: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def tiles(numbers: dict[str, Any], kinds: dict[str, str] | None = None) -> str:
    kinds = kinds or {}
    return '<div class="tiles">' + "".join(
        f'<div class="tile" data-number="{escape(k)}"><div class="v">{escape(_fmt(v, kinds.get(k, "")))}</div>'
        f'<div class="k">{escape(k)}</div></div>' for k, v in numbers.items()) + "</div>"


def line_chart(points: Sequence[tuple[float, float]], label: str, width: int = 640, height: int = 140,
               y_max: float | None = None, x_days: bool = False) -> str:
    """A small line chart (SVG): ``points`` as (x, y), y from 0."""
    if len(points) < 2:
        return empty(f"{label}: not enough points yet")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) or 1
    top = y_max if y_max is not None else (max(ys) or 1.0)
    pad = 28

    def at(x: float, y: float) -> str:
        px = pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)
        py = height - pad - min(y, top) / (top or 1) * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    path = " ".join(at(x, y) for x, y in points)
    left, right = (day(x0), day(x1)) if x_days else ("", "")
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{escape(label)}">'
            f'<text x="{pad}" y="14" font-size="12" fill="#5b6577">{escape(label)} (max {_fmt(top)})</text>'
            f'<polyline fill="none" stroke="#2b59c3" stroke-width="2" points="{path}"/>'
            f'<text x="{pad}" y="{height - 8}" font-size="11" fill="#5b6577">{left}</text>'
            f'<text x="{width - pad}" y="{height - 8}" font-size="11" fill="#5b6577" text-anchor="end">{right}</text>'
            "</svg>")


def bar_pairs(rows: Sequence[tuple[str, float, float]], labels: tuple[str, str], width: int = 640) -> str:
    """Two bars per row (e.g. size share and spend share), values in [0, 1]."""
    if not rows:
        return ""
    bar_h, gap, left = 10, 10, 180
    height = len(rows) * (2 * bar_h + gap) + 24
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{escape(" vs ".join(labels))}">',
             f'<text x="{left}" y="12" font-size="11" fill="#2b59c3">■ {escape(labels[0])}</text>'
             f'<text x="{left + 140}" y="12" font-size="11" fill="#d1812c">■ {escape(labels[1])}</text>']
    for i, (name, a, b) in enumerate(rows):
        y = 20 + i * (2 * bar_h + gap)
        scale = width - left - 60
        parts.append(f'<text x="4" y="{y + bar_h + 4}" font-size="12">{escape(name[:26])}</text>'
                     f'<rect x="{left}" y="{y}" width="{max(0.0, a) * scale:.1f}" height="{bar_h}" fill="#2b59c3"/>'
                     f'<rect x="{left}" y="{y + bar_h}" width="{max(0.0, b) * scale:.1f}" height="{bar_h}" '
                     f'fill="#d1812c"/>'
                     f'<text x="{left + max(a, b) * scale + 4:.1f}" y="{y + bar_h + 4}" font-size="11">'
                     f"{100 * a:.0f} % / {100 * b:.0f} %</text>")
    return "".join(parts) + "</svg>"


def _select(name: str, options: Iterable[str], chosen: str | None) -> str:
    opts = ['<option value="">all</option>'] + [
        f'<option value="{escape(o)}"{" selected" if o == chosen else ""}>{escape(o)}</option>' for o in options]
    return f'<label>{name}<select name="{name}" id="filter-{name}">{"".join(opts)}</select></label>'


def alert_rows(rows: Sequence[dict[str, Any]], link: bool = True) -> list[str]:
    out = []
    for a in rows:
        cid = escape(a["customer_id"])
        who = f'<a href="/ui/customer?id={quote(a["customer_id"])}">{cid}</a>' if link else cid
        reasons = "".join(f"<li>{escape(r.get('text', ''))}</li>" for r in a.get("reasons") or [])
        control = '<span class="control">control group: not contacted</span>' if a.get("control") else ""
        level = escape(a.get("risk_level", ""))
        out.append(
            f'<tr class="alert-row" data-customer="{cid}" data-tier="{escape(a.get("value_tier", ""))}" '
            f'data-risk="{level}" data-segment="{escape(str(a.get("segment")))}" '
            f'data-value-at-risk="{float(a.get("value_at_risk") or 0.0)}">'
            f'<td>{who}</td><td class="risk-{level}">{level}</td>'
            f'<td class="n" data-probability="{a.get("probability")}">{_fmt(a.get("probability"), "pct")}</td>'
            f'<td>{escape(a.get("value_tier", ""))}</td><td class="n">{_fmt(a.get("clv"), "money")}</td>'
            f'<td class="n">{_fmt(a.get("value_at_risk"), "money")}</td><td><ul class="reasons">{reasons}</ul></td>'
            f'<td>{escape(a.get("action", ""))} {control}</td><td>{day(a.get("ts"))}</td></tr>')
    return out


ALERT_HEADERS = ("Customer", "Risk", "Churn probability", "Value tier", "CLV", "Value at risk", "Why",
                 "Suggested action", "Alerted on")


def at_risk_body(rows: list[dict[str, Any]], totals: dict[str, Any], segments: list[str],
                 chosen: dict[str, str | None], watermark: int, live: bool = True, links: bool = True) -> str:
    intro = (f"<h1>Customers at risk</h1><p class='note'>Open churn alerts as of {day(watermark)} (event time), "
             "most urgent first: risk level, then value at risk.</p>")
    summary = tiles({"open alerts": totals["open"], "value at risk": totals["value_at_risk"],
                     "in the control group": totals["control"],
                     **{f"{level} risk": n for level, n in totals["by_risk"].items()}},
                    {"value at risk": "money"})
    filters = ""
    if live:
        filters = ('<form class="filters" method="get" action="/ui/" id="filters">'
                   + _select("tier", VALUE_TIERS, chosen.get("tier")) + _select("risk", RISK_ORDER, chosen.get("risk"))
                   + _select("segment", segments, chosen.get("segment"))
                   + '<button type="submit" id="apply-filters">Filter</button></form>')
    if not totals["open"]:
        return intro + summary + empty("No open alerts yet: none has been sent, or every one was cleared. Alerts "
                                       "need a trained churn model (see Health: model version).")
    body = table(ALERT_HEADERS, alert_rows(rows, link=live and links), "at-risk") if rows else empty(
        "No open alert matches these filters.")
    return intro + summary + filters + f"<p class='note' id='shown'>{len(rows)} shown</p>" + body


def customer_body(query: str, found: dict[str, Any] | None) -> str:
    search = ('<form method="get" action="/ui/customer" id="search"><label>Customer id<input name="id" '
              f'id="customer-id" value="{escape(query)}" autocomplete="off"></label>'
              '<button type="submit" id="search-button">Open</button></form>')
    if not query:
        return "<h1>Customer</h1>" + search + empty("Type a customer id to see their features, risk and alerts.")
    if found is None:
        return "<h1>Customer</h1>" + search + empty(f"No customer {query} is stored (or they were erased).")
    # the stored features, with the CLV recomputed from the churn probability as the API and the alerts give it
    features = {**(found.get("stored_features") or {}), "clv": (found.get("features") or {}).get("clv")}
    churn = found.get("churn") or {}
    rfm = found.get("rfm") or {}
    segment = found.get("segment") or {}
    head = tiles({"churn probability": churn.get("probability"), "value at risk": churn.get("value_at_risk"),
                  "RFM": f"{rfm.get('r', '–')}{rfm.get('f', '–')}{rfm.get('m', '–')} {rfm.get('segment', '')}".strip(),
                  "segment": segment.get("name") or "–", "model version": churn.get("model_version")},
                 {"churn probability": "pct", "value at risk": "money"})
    feature_rows = [f'<tr><th>{escape(k.replace("_", " "))}</th><td data-feature="{k}">{escape(_fmt(features[k]))}'
                    "</td></tr>" for k in CUSTOMER_FEATURES if k in features]
    history = [(float(ts), p) for ts, p in found.get("risk_history", [])]
    alerts = [a for a in found.get("alerts", []) if a["record"] == "alert"]
    cleared = {a["alert_id"]: a for a in found.get("alerts", []) if a["record"] == "cleared"}
    alert_lines = [f"<tr><td>{day(a['ts'])}</td><td class='risk-{escape(a['risk_level'])}'>{escape(a['risk_level'])}"
                   f"</td><td class='n'>{_fmt(a['probability'], 'pct')}</td><td>{escape(a.get('action', ''))}</td>"
                   f"<td>{'control group' if a.get('control') else 'contacted'}</td><td>"
                   + (escape(f"cleared {day(cleared[a['alert_id']]['ts'])} ({cleared[a['alert_id']]['cleared_by']})")
                      if a["alert_id"] in cleared else "open") + "</td></tr>" for a in alerts]
    done = [f"<tr><td>{day(i.get('ts'))}</td><td>{escape(str(i.get('action', '')))}</td>"
            f"<td class='n'>{_fmt(i.get('cost'), 'money')}</td></tr>" for i in found.get("interventions", [])]
    rec = found.get("last_recommendation") or {}
    return ("<h1 id='customer-title'>Customer " + escape(query) + "</h1>" + search + head
            + "<h2>Features</h2>" + table(("Feature", "Value"), feature_rows, "features")
            + "<h2>Churn risk over event time</h2>"
            + line_chart(history, "churn probability", y_max=1.0, x_days=True)
            + "<h2>Alerts</h2>" + (table(("Alerted on", "Risk", "Probability", "Action", "Group", "Now"),
                                         alert_lines, "customer-alerts") if alert_lines else empty("No alert."))
            + "<h2>Interventions</h2>" + (table(("On", "Action", "Cost"), done, "interventions")
                                          if done else empty("No intervention recorded."))
            + "<h2>Last recommendation</h2>" + (f"<p id='recommendation'>{escape(', '.join(rec.get('items', [])))} "
                                                f"<span class='note'>({escape(str(rec.get('trigger')))}, "
                                                f"{day(rec.get('ts'))})</span></p>" if rec else empty("None yet.")))


def segments_body(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<h1>Segments</h1>" + empty("No customers stored yet.")
    lines = [f'<tr class="segment-row" data-segment="{escape(r["id"])}" data-customers="{r["customers"]}">'
             f"<td>{escape(r['name'])}</td><td class='n'>{r['customers']}</td>"
             f"<td class='n'>{_fmt(r['size_share'], 'pct')}</td><td class='n'>{_fmt(r['spend_share'], 'pct')}</td>"
             f"<td>{escape('; '.join(r['traits']))}</td></tr>" for r in rows]
    shares = [(r["name"], r["size_share"] or 0.0, r["spend_share"] or 0.0) for r in rows if r["size_share"] is not None]
    note = "" if shares else "<p class='note'>The segment model has not learned enough yet: shares and traits come " \
                             "with its first checkpoint.</p>"
    return ("<h1>Segments</h1><p class='note'>Customers now in each segment, the segment's share of recent "
            "customers and of recent spend, and what sets it apart.</p>"
            + table(("Segment", "Customers", "Share of customers", "Share of spend", "Traits"), lines, "segments")
            + note + bar_pairs(shares, ("share of customers", "share of spend")))


def uplift_body(rows: list[dict[str, Any]]) -> str:
    intro = ("<h1>Do interventions work?</h1><p class='note'>Retention of alerted customers who were contacted "
             "(treated) against the control group (not contacted), with 95 % intervals on the difference.</p>")
    if not rows:
        return intro + empty("No alert outcome yet: an alert's outcome is decided its outcome window after it "
                             "(`streamproc retention` keeps the ledger).")
    lines = []
    for r in rows:
        t_rate = r["treated_retained"] / r["treated"] if r["treated"] else None
        c_rate = r["control_retained"] / r["control"] if r["control"] else None
        lines.append(f'<tr class="uplift-row" data-key="{escape(r["key"])}"><td>{escape(r["key"])}</td>'
                     f"<td class='n'>{r['treated']}</td><td class='n'>{_fmt(t_rate, 'pct')}</td>"
                     f"<td class='n'>{r['control']}</td><td class='n'>{_fmt(c_rate, 'pct')}</td>"
                     f"<td class='n'>{_fmt(r['uplift'], 'pct')}</td>"
                     f"<td class='n'>{_fmt(r['lower'], 'pct')} … {_fmt(r['upper'], 'pct')}</td></tr>")
    return intro + table(("Breakdown", "Treated", "Retained", "Control", "Retained", "Uplift", "95 % interval"),
                         lines, "uplift")


def health_body(numbers: dict[str, float | None], rates: list[float], lags: list[float]) -> str:
    return ("<h1>Health</h1><p class='note'>Is the engine keeping up, and is the churn model any good?</p>"
            + tiles(numbers) + "<h2>Events a second</h2>"
            + line_chart(list(enumerate(rates)), "events a second (last minutes)")
            + "<h2>Records behind</h2>" + line_chart(list(enumerate(lags)), "consumer lag (records)"))


def login_body(error: bool) -> str:
    wrong = "<p class='risk-critical' id='login-error'>That token is not right.</p>" if error else ""
    return ("<h1>Sign in</h1><p class='note'>The same token as the lookup API (STREAMPROC_HTTP_TOKEN).</p>" + wrong
            + '<form method="post" action="/ui/login" id="login"><label>Token<input type="password" name="token" '
              'id="token" autocomplete="current-password"></label><button type="submit" id="sign-in">Sign in'
              "</button></form>")


def report_document(board: Any, segments: list[dict[str, Any]], uplift: list[dict[str, Any]],
                    numbers: dict[str, float | None], rows: int) -> str:
    """Every page's figures in one document (no links, no form, no script): to send to someone."""
    at_risk = at_risk_body(board.at_risk(limit=rows), board.totals(), [], {}, board.watermark, live=False)
    body = (f"<p class='note'>Report as of {day(board.watermark)} (event time). The {rows} most urgent open alerts "
            "are listed; the totals count them all.</p>" + at_risk + segments_body(segments) + uplift_body(uplift)
            + "<h1>Health</h1>" + tiles(numbers))
    return document(f"Retention report {day(board.watermark)}", body, nav=False)
