"""`medfed data check`: what a hospital runs on its own data before it joins a federation.

It decodes every file exactly as training would (so "readable here" means "trainable"), and
reports counts per class (and site), each unusable file with the reason, duplicate images,
image sizes and bit depths, the DICOM acquisition summary, and the risk that one patient's
images end up on both sides of a split. It reads only; nothing is sent anywhere. The verdict is
"usable" only when training would accept the data as it is, without `--skip-bad`.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from importlib.metadata import version
from pathlib import Path

from medfed.common.progress import tracked
from medfed.common.sources import Problem, decoded, discover
from medfed.common.splits import GROUP_FOLDS

# Fewer readable images than this in a class cannot give it a place in train, val and test.
MIN_PER_CLASS = 10
LISTED = 20


def check(path: str | Path, *, classes: list[str] | None = None, frame: int | None = None) -> dict:
    collection = discover(path, classes=classes)
    problems = list(collection.problems)
    per_class: Counter = Counter()
    per_site: dict[str, Counter] = defaultdict(Counter)
    by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)
    formats, channels, bits, sizes = Counter(), Counter(), Counter(), Counter()
    dicom = {key: Counter() for key in ("modality", "photometric", "bits", "transfer_syntax")}
    bits_of: dict[str, int] = {}
    patients: dict[str, set[str]] = defaultdict(set)
    patient_sites: dict[str, set[str]] = defaultdict(set)
    patient_source = "manifest patient_id" if any(r.patient_id for r in collection.records) else None
    with_patient = 0
    files = tracked(decoded(collection, frame=frame), what=f"checking {collection.root.name}",
                    total=len(collection.records))
    for record, result in files:
        if isinstance(result, Problem):
            problems.append(result)
            continue
        name = collection.relative(record.path)
        info = result.info
        per_class[record.label] += 1
        if record.site:
            per_site[record.site][record.label] += 1
        digest = hashlib.sha256(result.pixels.tobytes() + str(result.pixels.shape).encode()).hexdigest()
        by_hash[digest].append((name, record.label))
        formats[info["format"]] += 1
        channels[info["channels"]] += 1
        bits[info["bits"]] += 1
        bits_of[name] = info["bits"]
        sizes[(info["height"], info["width"])] += 1
        if info["format"] == "dicom":
            for key in dicom:
                dicom[key][str(info.get(key))] += 1
        patient = record.patient_id or info.get("patient_id")
        with_patient += bool(patient)
        if patient:
            patient_source = patient_source or "DICOM PatientID"
            patients[patient].add(record.label)
            if record.site:
                patient_sites[patient].add(record.site)

    readable = sum(per_class.values())
    errors, warnings = [], []
    if problems:
        errors.append(f"{len(problems)} file(s) cannot be used (listed under 'problems'); training "
                      f"refuses them unless run with --skip-bad")
    present = [c for c in collection.classes if per_class[c]]
    if len(present) < 2:
        errors.append(f"readable images of {len(present)} class(es) only; a classifier needs two or more")
    small = [f"{c}: {per_class[c]}" for c in present if per_class[c] < MIN_PER_CLASS]
    if small:
        warnings.append(f"classes with fewer than {MIN_PER_CLASS} images cannot be represented in "
                        f"train, validation and test: {', '.join(small)}")

    # Training splits by patient once any image names one (an image without is its own patient).
    split_units = len(patients) + readable - with_patient
    if patients and split_units < GROUP_FOLDS:
        errors.append(f"images of only {split_units} patient(s); a patient-level train/val/test "
                      f"split needs at least {GROUP_FOLDS}: add data, or drop the patient ids if "
                      f"every image really is a different patient")
    duplicates = [group for group in by_hash.values() if len(group) > 1]
    conflicting = [group for group in duplicates if len({label for _, label in group}) > 1]
    if conflicting:
        errors.append(f"{len(conflicting)} image(s) appear under different labels (see 'duplicates'); "
                      f"fix the labels")
    if len(duplicates) > len(conflicting):
        warnings.append(f"{len(duplicates) - len(conflicting)} group(s) of identical images: a copy in "
                        f"train and one in test inflates the test metrics")
    if len(bits) > 1:
        common_bits = bits.most_common(1)[0][0]
        odd = sorted(f for f, b in bits_of.items() if b != common_bits)
        warnings.append(f"mixed bit depths {dict(sorted(bits.items()))}: these differ from the usual "
                        f"{common_bits}-bit: {', '.join(odd[:LISTED])}"
                        + (f" … and {len(odd) - LISTED} more" if len(odd) > LISTED else ""))
    if collection.ignored:
        warnings.append(f"{len(collection.ignored)} file(s) in class folders are not images and are "
                        f"ignored: {', '.join(collection.ignored[:LISTED])}")
    leakage = _leakage(patients, patient_sites, readable=readable, source=patient_source)
    warnings += leakage.pop("warnings")

    return {
        "source": str(collection.root.resolve()),
        "kind": collection.kind,
        "medfed_version": version("medfed"),
        "usable": not errors,
        "errors": errors,
        "warnings": warnings,
        "classes": {c: per_class[c] for c in collection.classes},
        "sites": {s: dict(sorted(c.items())) for s, c in sorted(per_site.items())} or None,
        "files": {"listed": len(collection.records) + len(collection.problems), "readable": readable,
                  "unusable": len(problems), "ignored": len(collection.ignored)},
        "problems": [{"file": p.file, "reason": p.reason} for p in problems],
        "duplicates": [[f for f, _ in group] for group in duplicates],
        "images": {
            "formats": dict(formats),
            "channels": {str(k): v for k, v in sorted(channels.items())},
            "bits": {str(k): v for k, v in sorted(bits.items())},
            "sizes": [{"height": h, "width": w, "count": n} for (h, w), n in sizes.most_common(10)],
            "distinct_sizes": len(sizes),
        },
        "dicom": {key: dict(counter) for key, counter in dicom.items()} if formats["dicom"] else None,
        "patients": leakage,
    }


def _leakage(patients: dict[str, set[str]], sites: dict[str, set[str]], *, readable: int,
             source: str | None) -> dict:
    """How likely a split puts one patient on both sides, and why."""
    if not patients:
        return {
            "source": None, "count": None, "risk": "unknown",
            "warnings": ["no patient ids (manifest patient_id column or DICOM PatientID): medfed "
                         "cannot keep a patient's images on one side of the split. If patients have "
                         "several images, add a patient_id column"],
        }
    several_labels = sorted(p for p, labels in patients.items() if len(labels) > 1)
    several_sites = sorted(p for p, s in sites.items() if len(s) > 1)
    warnings = []
    if several_sites:
        warnings.append(f"{len(several_sites)} patient(s) appear at more than one site: "
                        f"{', '.join(several_sites[:LISTED])}")
    if several_labels:
        warnings.append(f"{len(several_labels)} patient(s) have images under more than one label "
                        f"(check the labels): {', '.join(several_labels[:LISTED])}")
    return {
        "source": source,
        "count": len(patients),
        "risk": "high" if several_sites else "low (splits keep each patient on one side)",
        "several_labels": several_labels,
        "several_sites": several_sites,
        "warnings": warnings,
    }


def render(summary: dict) -> str:
    """The terminal summary a hospital's engineer reads."""
    lines = [f"{summary['source']} ({summary['kind']}): {summary['files']['readable']} readable of "
             f"{summary['files']['listed']} listed"]
    lines.append("classes: " + ", ".join(f"{c} {n}" for c, n in summary["classes"].items()))
    if summary["sites"]:
        for site, counts in summary["sites"].items():
            lines.append(f"  site {site}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    images = summary["images"]
    if images["sizes"]:
        top = images["sizes"][0]
        lines.append(f"images: formats {images['formats']}, channels {images['channels']}, bits "
                     f"{images['bits']}, {images['distinct_sizes']} distinct size(s), most common "
                     f"{top['height']}x{top['width']} ({top['count']})")
    if summary["dicom"]:
        lines.append("DICOM: " + "; ".join(f"{k} {v}" for k, v in summary["dicom"].items()))
    patients = summary["patients"]
    lines.append(f"patients: {patients['count'] if patients['count'] is not None else 'unknown'}"
                 f" ({patients['source'] or 'no ids'}), leakage risk {patients['risk']}")
    for problem in summary["problems"]:
        lines.append(f"problem: {problem['file']}: {problem['reason']}")
    lines += [f"warning: {w}" for w in summary["warnings"]]
    lines += [f"error: {e}" for e in summary["errors"]]
    lines.append("verdict: " + ("usable" if summary["usable"] else "NOT usable as it is"))
    return "\n".join(lines)

