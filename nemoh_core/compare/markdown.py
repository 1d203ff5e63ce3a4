"""The comparison as a short markdown summary, sized for a pull-request comment (lists capped)."""

from __future__ import annotations

from typing import Any

from nemoh.errors import one_line

CAP = 8


def _code(s: Any) -> str:
    return "`" + one_line(s).replace("`", "'") + "`"


def _items(lines: list[str], cap: int = CAP) -> list[str]:
    out = [f"- {one_line(x)}" for x in lines[:cap]]
    return out + ([f"- ... and {len(lines) - cap} more (see the HTML or JSON)"] if len(lines) > cap else [])


def _env(c: dict[str, Any]) -> str:
    e = c["environment"]
    parts = [f"{d['name']} {d['base']} -> {d['new']}" for d in (e.get("packages", []) + e.get("device", []))[:4]]
    if e.get("tolerances"):
        parts.append(f"{len(e['tolerances'])} tolerances changed")
    return "same environment" if not parts else "environment differs: " + "; ".join(parts)


def _rules(rules: list[dict[str, Any]]) -> str:
    return ",".join(r["rule"] + ("" if r["threshold_pct"] is None else f"={r['threshold_pct']:g}") for r in rules)


def render(comp: dict[str, Any]) -> str:
    v = comp["verdict"]
    mark = "REGRESSION" if v["regressed"] else "no regression"
    lines = [f"### nemoh compare: {mark}", "", one_line(v["headline"]), "",
             f"base {_code(comp['base'])} -> new {_code(comp['new'])}; rules {_code(_rules(comp['rules']))}", "",
             "| model | kind | regressions | flagged | summary |", "|---|---|---|---|---|"]
    for c in comp["comparisons"]:
        if c["kind"] == "conformance":
            ch, nb, nn = c["changes"], c["counts"]["base"], c["counts"]["new"]
            summ = (f"OK {nb['OK']}->{nn['OK']}, FAIL {nb['FAIL']}->{nn['FAIL']}; {len(ch['new_fail'])} new FAIL, "
                    f"{len(ch['new_pass'])} new pass, {len(ch['appeared'])} appeared, "
                    f"{len(ch['disappeared'])} disappeared")
        else:
            summ = c["validity"]["text"]
        lines.append(f"| {one_line(c['model'])} | {c['kind']} | {len(c['regressions'])} | {len(c['flags'])} | "
                     f"{one_line(summ).replace('|', '/')}; {one_line(_env(c)).replace('|', '/')} |")
    for key, title in (("only_in_base", "only in base"), ("only_in_new", "only in new")):
        if comp[key]:
            lines += ["", f"{title}: " + ", ".join(map(_code, comp[key]))]
    for c in comp["comparisons"]:
        if c["regressions"]:
            lines += ["", f"**Regressions, {one_line(c['model'])} ({c['kind']})**", *_items(c["regressions"])]
    flagged = [f"{c['model']}: {f}" for c in comp["comparisons"] for f in c["flags"]]
    if flagged:
        lines += ["", "<details><summary>Flagged changes (" + str(len(flagged)) + ")</summary>", "",
                  *_items(flagged, 15), "", "</details>"]
    return "\n".join(lines) + "\n"
