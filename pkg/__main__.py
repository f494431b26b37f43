"""`python -m medfed`: the `medfed` command, for environments without the script on PATH."""

from medfed.cli.main import run

if __name__ == "__main__":
    run()
