"""Entrypoint for `ray job submit`: the same options as `archive-restore run`.

    ray job submit --working-dir . -- python jobs/restore_archive.py \
        --manifest s3://museum/manifests/scans.parquet --output s3://museum/restored/ --config jobs/museum.yaml
"""

import sys
from pathlib import Path

# With --working-dir the package travels as source: make it importable when it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["-v", "run", *sys.argv[1:]])
