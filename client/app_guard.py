"""What a hospital runs for the server: medfed's installed ClientApp, and nothing else.

Flower's SuperNode executes whatever Flower App Bundle (FAB) a run names: `flwr-clientapp`
unpacks it and puts it first on `sys.path`, so a bundle carrying code of its own — a `medfed/`
folder that shadows the installed one, or any other ClientApp — runs at the hospital with access
to its data. Flower 1.42's one built-in refusal (`flower-supernode --trusted-entities`) accepts
only bundles signed through Flower Hub, never one a coordinator submits with `flwr run`.

So `medfed client` puts this program first on its SuperNode's PATH under the name
`flwr-clientapp` (Flower's SuperExec starts that program by name for every message). It runs
Flower's own ClientApp process with one check added: the bundle of the message's run is refused
before any of it is installed or imported unless it is a medfed study bundle — a pyproject.toml
alone (plus Flower's `.info/`), naming medfed's ClientApp, whose content hash is the one the run
declares. A refusal becomes an error reply to the server and a line in the site's log. Every
message, refused or not, leaves an entry in the site's audit log (client/audit.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import tomllib
import zipfile
from pathlib import Path

from medfed.client import audit

# Taken before Flower, torch and the app are imported (in main): a message's cost at the site
# includes them.
STARTED = time.monotonic()

CLIENTAPP = "medfed.client.app:app"
REFUSED = "medfed refused the app of run"


class ForeignApp(Exception):
    """The run's app bundle is not a medfed study bundle."""


def check_bundle(content: bytes, *, declared_hash: str) -> None:
    """Raise ForeignApp unless `content` is a medfed study bundle whose hash is `declared_hash`."""
    actual = hashlib.sha256(content).hexdigest()
    if actual != declared_hash:
        # Flower installs by the content's hash but loads by the declared one: a mismatch could
        # load a bundle installed earlier.
        raise ForeignApp(f"its bundle hashes to {actual[:12]}, not the declared {declared_hash[:12]}")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            names = bundle.namelist()
            carried = [n for n in names if n != "pyproject.toml" and not n.startswith(".info/")]
            if carried:
                raise ForeignApp(f"its bundle carries files of its own ({', '.join(carried[:3])}); "
                                 f"a medfed study bundle holds a pyproject.toml only")
            project = tomllib.loads(bundle.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ForeignApp(f"its bundle is not a readable Flower app ({exc})") from None
    component = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if component != CLIENTAPP:
        raise ForeignApp(f"its ClientApp is {component!r}, not medfed's {CLIENTAPP!r}")


def main() -> None:
    """`flwr-clientapp` with the bundle check (Flower's own code does everything else)."""
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    pulled = {}
    pull, install, push = runtime.pull_task_input, runtime.install_from_fab, runtime.push_message

    def pull_task_input(client):
        message, context, run, fab = pull(client)
        pulled.update(message=message, run=run, fab=fab)
        return message, context, run, fab

    def install_from_fab(content, *args, **kwargs):
        # Flower calls this right after pulling the message and before importing anything of the
        # run; an exception here becomes the message's error reply.
        run, fab = pulled["run"], pulled["fab"]
        try:
            check_bundle(content, declared_hash=fab.hash_str)
            if run.fab_hash != fab.hash_str:
                raise ForeignApp(f"the run declares bundle {run.fab_hash[:12]} but sent {fab.hash_str[:12]}")
        except ForeignApp as exc:
            pulled["refused"] = str(exc)
            raise ForeignApp(f"{REFUSED} {run.run_id} ({run.fab_id}): {exc}") from None
        return install(content, *args, **kwargs)

    def push_message(client, reply, context):
        if os.environ.get(audit.AUDIT_ENV) and "message" in pulled:
            audit.append(Path(os.environ[audit.AUDIT_ENV]), _entry(pulled, reply))
        return push(client, reply, context)

    runtime.pull_task_input = pull_task_input
    runtime.install_from_fab = install_from_fab
    runtime.push_message = push_message
    flwr_clientapp()


def _entry(pulled: dict, reply) -> dict:
    message, run = pulled["message"], pulled["run"]
    config = message.content.config_records.get("config", {}) if message.has_content() else {}
    entry = {"run": run.run_id, "app": run.fab_id, "app_hash": pulled["fab"].hash_str,
             "type": message.metadata.message_type, "round": config.get("server-round"),
             # This process's life until the reply: imports, data, model, training, evaluation.
             "seconds": round(time.monotonic() - STARTED, 3)}
    if "refused" in pulled:
        return {**entry, "refused": pulled["refused"]}
    if reply.has_error():
        return {**entry, "error": reply.error.reason}
    return {**entry, "sent": audit.describe_reply(reply.content)}


if __name__ == "__main__":
    main()
