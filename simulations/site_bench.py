"""What a hospital-sized site costs per message: a benchmark, not a test (docs/BENCHMARKS.md).

`messages`: a real loopback deployment — `medfed server start` (SuperLink behind nginx, TLS,
SuperNode authentication) and three `medfed client` processes — where every site holds real
DICOM radiographs (hard links to pydicom-data's CR files, so the disk holds each file once,
listed in a CSV manifest that makes each copy its own patient).
From each site's audit log (the ClientApp process's life per message) and the server's report
(the seconds spent in optimization steps) it gives the time a site spends per message outside
training, first round against later rounds.

`memory`: one site process answering one training message for a folder of N synthetic images
(hard links to a few PNGs), exactly as a SuperNode's ClientApp process would, with its peak
resident memory.

    python -m medfed.simulations.site_bench messages --images 500 --rounds 3 --out /tmp/sb
    python -m medfed.simulations.site_bench memory --images 20000 --out /tmp/sb-mem
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from medfed.common.config import Config
from medfed.common.flower_commands import free_port
from medfed.server.certs import init_certs

SITES = ("hospital-a", "hospital-b", "hospital-c")
CLASSES = ("normal", "pneumonia")
# Real computed radiographs from pydicom-data: uncompressed and JPEG 2000, 1760-1955 px a side.
RADIOGRAPHS = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG2_UNCR.dcm", "RG1_J2KR.dcm", "RG3_J2KR.dcm")
MEDFED = shutil.which("medfed") or str(Path(sys.executable).with_name("medfed"))


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def radiograph_folder(root: Path, *, images: int) -> Path:
    """A CSV manifest over the copies: each its own patient (the copies of one file share its
    PatientID, and a site splits by patient)."""
    from pydicom.data import get_testdata_file

    sources = [Path(p) for name in RADIOGRAPHS if (p := get_testdata_file(name, download=False))]
    if not sources:
        raise SystemExit("pydicom-data is not installed (pip install pydicom-data)")
    rows = ["path,label,patient_id"]
    for i in range(images):
        name = f"{CLASSES[i % 2]}/{i:05d}.dcm"
        _link(sources[i % len(sources)], root / name)
        rows.append(f"{name},{CLASSES[i % 2]},P{i:05d}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def messages(out: Path, *, images: int, rounds: int, backbone: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    init_certs(out / "certs", server_host="fl.example.org", sites=list(SITES))
    (out / "sites.yaml").write_text(yaml.safe_dump(
        {"sites": {s: str(out / "certs" / s / "node-auth.pub") for s in SITES}}))
    study = {"data": {"classes": list(CLASSES), "image_size": 224},
             "model": {"backbone": backbone}, "train": {"device": "cpu"},
             "federation": {"rounds": rounds, "round_timeout": 3600}}
    (out / "study.yaml").write_text(yaml.safe_dump(study))
    env = {**os.environ, "MEDFED_OFFLINE": "1", "FLWR_HOME": str(out / "flwr-home")}
    port = free_port()
    processes = []

    def start(name: str, *args: str) -> subprocess.Popen:
        with (out / f"{name}.out").open("w") as stdout, (out / f"{name}.err").open("w") as stderr:
            processes.append(subprocess.Popen([MEDFED, *args], stdout=stdout, stderr=stderr,
                                              env=env, stdin=subprocess.DEVNULL))
        return processes[-1]

    began = time.monotonic()
    try:
        server = start("server", "server", "start", "--config", str(out / "study.yaml"),
                       "--certs", str(out / "certs"), "--sites", str(out / "sites.yaml"),
                       "--out", str(out / "run"), "--host", "127.0.0.1", "--port", str(port),
                       "--wait-sites", "10m")
        for site in SITES:
            data = radiograph_folder(out / "data" / site, images=images)
            start(site, "client", "--site", site, "--data", str(data),
                  "--superlink", f"localhost:{port}", "--certs", str(out / "certs" / site),
                  "--log-file", str(out / f"{site}.log"), "--connect-timeout", "600")
        if server.wait(timeout=7200) != 0:
            raise SystemExit(f"the server failed; see {out}/server.err")
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    report = json.loads((out / "run" / "report.json").read_text())
    per_site = {}
    for site in SITES:
        trained = {r["round"]: r["train"].get(site, {}) for r in report["rounds"]}
        entries = [json.loads(line) for line in (out / f"{site}.audit.jsonl").read_text().splitlines()]
        rows = []
        for entry in entries:
            train_s = trained.get(entry.get("round"), {}).get("train_s", 0.0) \
                if entry["type"] == "train" else 0.0
            rows.append({"type": entry["type"], "round": entry.get("round"),
                         "seconds": entry["seconds"], "train_s": train_s,
                         "outside_training_s": entry["seconds"] - train_s,
                         "peak_mb": trained.get(entry.get("round"), {}).get("peak_mb")
                         if entry["type"] == "train" else None})
        per_site[site] = rows
    # The first message that reads the site's data pays the decoding and the features: round 1's
    # training, or before it the head start's request for class sums; the roll call reads none.
    reading = [[r for r in rows if r["type"] != "query"] for rows in per_site.values()]
    first = [rows[0]["outside_training_s"] for rows in reading]
    later = [r["outside_training_s"] for rows in reading for r in rows[1:] if r["type"] == "train"]
    return {
        "benchmark": "messages", "images_per_site": images, "rounds": rounds, "backbone": backbone,
        "wall_s": time.monotonic() - began, "machine": _machine(),
        "first_message_outside_training_s": first,
        "later_training_messages_outside_training_s": later,
        "ratio_first_to_later": float(np.mean(first) / np.mean(later)) if later else None,
        "messages": per_site,
    }


def memory(out: Path, *, images: int, backbone: str) -> dict:
    """One training message for a folder of `images` PNGs, in a fresh process (its peak RSS)."""
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "data"
    if not folder.is_dir():
        from PIL import Image

        rng = np.random.default_rng(0)
        originals = []
        for k in range(8):
            file = out / f"original-{k}.png"
            Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8)).save(file)
            originals.append(file)
        for i in range(images):
            _link(originals[i % len(originals)], folder / CLASSES[i % 2] / f"{i:06d}.png")
    began = time.monotonic()
    child = subprocess.run([sys.executable, "-m", "medfed.simulations.site_bench", "one-message",
                            "--data", str(folder), "--out", str(out), "--backbone", backbone],
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(child.stderr[-3000:])
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return {"benchmark": "memory", "images": images, "backbone": backbone,
            "wall_s": time.monotonic() - began, "machine": _machine(), **result,
            "log": child.stderr.strip().splitlines()[-12:]}


def one_message(data: Path, *, out: Path, backbone: str) -> dict:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from medfed.client.app import app
    from medfed.common import messages as wire_messages
    from medfed.common import wire
    from medfed.common.config_checks import validate
    from medfed.common.model import build_model
    from medfed.common.schedule import HEAD

    # What Flower sets in a real ClientApp process before it builds a message.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    config = Config()
    config.data.classes = list(CLASSES)
    config.data.image_size, config.model.backbone, config.train.device = 224, backbone, "cpu"
    config = validate(config)
    model = build_model(config.model, num_classes=len(CLASSES), seed=config.seed)
    keys = wire.exchanged_keys(model, bn=config.model.bn, stage=HEAD)
    round_values = {**wire_messages.round_config(config, classes=list(CLASSES), study="bench"),
                    "server-round": 1}
    sent = wire_messages.with_round_values(ConfigRecord(), round_values, lr=config.train.head_lr,
                                           stage=HEAD)
    message = Message(content=RecordDict({wire_messages.ARRAYS: wire.to_record(model, keys),
                                          wire_messages.CONFIG: sent}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"site": "hospital-a", "data-path": str(data),
                                   "state-dir": str(out / "state")})
    started = time.monotonic()
    reply = app(message, context)
    return {"message_s": time.monotonic() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_examples": int(reply.content["metrics"][wire_messages.WEIGHT_KEY])}


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("messages", "memory", "one-message"))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default=Config().model.backbone)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    if args.what == "messages":
        result = messages(args.out, images=args.images, rounds=args.rounds, backbone=args.backbone)
    elif args.what == "memory":
        result = memory(args.out, images=args.images, backbone=args.backbone)
    else:
        result = one_message(args.data, out=args.out, backbone=args.backbone)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
