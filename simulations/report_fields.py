"""Reading a comparison report dict for its renderings.

A report may lack any part (an interrupted run, an older file), so every reader here answers with
an empty value instead of failing, and the renderings say what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence

GLOBAL = "global"


def report_title(report: dict) -> str:
    name = (report.get("dataset") or {}).get("name") or "unnamed dataset"
    return f"medfed comparison report: {name}"


def class_names(report: dict) -> list[str]:
    return [str(c) for c in (report.get("dataset") or {}).get("classes") or []]


def mode_names(report: dict) -> list[str]:
    return list(report.get("modes") or [])


def site_names(report: dict) -> list[str]:
    """Sites in report order; names seen only in the summary or the first run's results are
    appended, so no site's numbers are dropped."""
    names = list(report.get("sites") or {})
    tables = [*(report.get("summary") or {}).values(),
              *((e or {}).get("results") for e in (first_run(report).get("modes") or {}).values())]
    for per_site in tables:
        names += [s for s in per_site or {} if s != GLOBAL and s not in names]
    return names


def attackers(report: dict) -> list[str]:
    return list((report.get("attack") or {}).get("sites") or [])


def all_runs(report: dict) -> list[dict]:
    return list(report.get("runs") or [])


def first_run(report: dict) -> dict:
    runs = all_runs(report)
    return runs[0] if runs else {"modes": {}}


def mode_entry(run: dict, mode: str) -> dict:
    return (run.get("modes") or {}).get(mode) or {}


def summary_cell(summary: dict, mode: str, site: str, *, metric: str) -> dict | None:
    return ((summary.get(mode) or {}).get(site) or {}).get(metric)


def results_at(run: dict, modes: Sequence[str], site: str) -> list[tuple[str, dict]]:
    """(label, RESULT) of every model tested on `site`; on the global test set that includes each
    local site model, since local training has no single global model."""
    found = []
    for mode in modes:
        entry = mode_entry(run, mode)
        result = (entry.get("results") or {}).get(site)
        if result:
            found.append((mode, result))
        if site == GLOBAL:
            for owner, local in (entry.get("local_on_global") or {}).items():
                found.append((f"{mode} (model of site {owner})", local))
    return found


def final_runs(report: dict) -> list[dict]:
    """The runs the summary and the paired tests use: those with all the training data."""
    runs = all_runs(report)
    largest = max((r["fraction"] for r in runs if r.get("fraction") is not None), default=None)
    return [r for r in runs if r.get("fraction") in (largest, None)]


def global_result(entry: dict) -> dict | None:
    """A mode's RESULT on the global test set in one run; for local, the best site model's (as
    in summary)."""
    result = (entry.get("results") or {}).get(GLOBAL)
    if result:
        return result
    models = [r for r in (entry.get("local_on_global") or {}).values()
              if (r.get("metrics") or {}).get("auc") is not None]
    return max(models, key=lambda r: r["metrics"]["auc"]) if models else None


def global_auc(entry: dict) -> float | None:
    """A mode's global test AUC in one run; for local, the best site model's (as in summary)."""
    return ((global_result(entry) or {}).get("metrics") or {}).get("auc")
