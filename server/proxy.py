"""The sites' only door: nginx in front of the SuperLink, passing the Fleet API and nothing else.

Flower 1.42's SuperLink serves the Fleet API (`/v1/fleet`, the sites), the Control API
(`/v1/control`, `flwr run/ls/supernode register`, no authentication in Flower's free edition) and
the Runtime API (`/v1/runtime`, the ServerApp) on one port. A firewall cannot split one port by
URL path, so the SuperLink listens on the coordinator's loopback only and nginx, on the public
address, terminates the sites' TLS with the federation's server certificate and forwards
`/v1/fleet/*` (and `/health`) to it over TLS verified against the federation's CA; every other
path is refused with 403 before it reaches Flower.

nginx (Debian's `nginx-light` is enough): small, well kept, in every distribution and container
base, configured by one file medfed writes, and it speaks both HTTP/1.1 and HTTP/2 to the sites.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from medfed.common.errors import MedfedError
from medfed.common.flower_commands import flower_env
from medfed.common.processes import Child
from medfed.server.certs import CA_CERT, SERVER_CERT, SERVER_KEY

# What the sites' SuperNodes call (`/v1/fleet/pull-messages`, ...); Flower's SuperNode uses
# nothing else. Matched on nginx's normalised path and forwarded as that path, so no encoded
# `..` or `%2F` can carry a request from here into another API.
FLEET_PATHS = "^/v1/fleet/[a-z-]+$"
HEALTH_PATH = "/health"
# A model payload travels in one request body; EfficientNet-Lite0 whole is ~14 MB, VGG16 ~500 MB.
MAX_BODY = "2g"
# Longer than Flower's own request timeouts, so nginx never cuts a slow upload short.
UPSTREAM_TIMEOUT_S = 600
# nginx's scratch folders, kept inside the study's folder (the container's root is read-only).
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_executable() -> str:
    found = shutil.which("nginx") or next(
        (str(p) for p in (Path("/usr/sbin/nginx"), Path("/usr/local/sbin/nginx")) if p.is_file()), None)
    if found is None:
        raise MedfedError("nginx is not installed, and `medfed server start` puts it in front of the "
                          "SuperLink so that only the sites' Fleet API reaches the network; install it "
                          "(Debian/Ubuntu: apt-get install nginx-light) or use the medfed container image")
    return found


def nginx_config(*, folder: Path, host: str, port: int, upstream_port: int,
                 certs: Path | None) -> str:
    """nginx.conf for one study (`certs` None: plaintext on both sides, for tests only); every
    path it writes is inside `folder`."""
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if certs is None:
        listen_options, tls, upstream, upstream_tls = "", "", f"http://127.0.0.1:{upstream_port}", ""
    else:
        # `listen ... http2` rather than `http2 on`: the latter needs nginx 1.25 (Debian 12 has 1.22).
        listen_options = " ssl http2"
        tls = f"""
        ssl_certificate {certs / SERVER_CERT};
        ssl_certificate_key {certs / SERVER_KEY};
        ssl_protocols TLSv1.2 TLSv1.3;"""
        upstream = f"https://127.0.0.1:{upstream_port}"
        upstream_tls = f"""
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {certs / CA_CERT};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;"""
    forward = f"""
            proxy_pass {upstream}$uri;{upstream_tls}
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;
            proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;"""
    return f"""# Written by `medfed server start`; regenerated at every start.
daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log stderr warn;

events {{
    worker_connections 512;
}}

http {{
    access_log {folder / "access.log"};
    {" ".join(f"{name}_temp_path {folder / name};" for name in TEMP_DIRS)}
    server_tokens off;
    client_max_body_size {MAX_BODY};

    server {{
        listen {listen}{listen_options};{tls}

        location ~ {FLEET_PATHS} {{
            limit_except POST {{ deny all; }}{forward}
        }}
        location = {HEALTH_PATH} {{
            limit_except GET {{ deny all; }}{forward}
        }}
        # The Control and Runtime APIs, the docs, anything else: not from the network.
        location / {{
            return 403;
        }}
    }}
}}
"""


def start_proxy(*, folder: Path, host: str, port: int, upstream_port: int, certs: Path | None,
                log: Path) -> Child:
    """nginx as a supervised child of `medfed server start`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "nginx.conf"
    config.write_text(nginx_config(folder=folder, host=host, port=port,
                                   upstream_port=upstream_port, certs=certs))
    for name in TEMP_DIRS:
        # Run as root, nginx's workers drop to an unprivileged user that must write here.
        (folder / name).mkdir(exist_ok=True)
        (folder / name).chmod(0o1777)
    return Child([nginx_executable(), "-p", str(folder), "-c", str(config), "-e", "stderr"],
                 log=log, env=flower_env())
