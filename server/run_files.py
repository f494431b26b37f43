"""What a `medfed server start` run directory holds, by name: written by the CLI side
(server/superlink.py) or by the deployed ServerApp (server/app.py), read by both and by
`medfed status`."""

CONFIG_FILE = "config.yaml"      # the study's resolved config; a resumed run reads it back
REPORT_FILE = "report.json"
PROGRESS_FILE = "progress.log"   # the ServerApp's progress lines, echoed by the CLI
ERROR_FILE = "error.txt"         # why the ServerApp failed, for the CLI's one error line
NODES_FILE = "nodes.json"        # site name -> the Flower node id its key was registered as
