"""Entrypoint for `ray job submit`: the same options as `archive-restore run`.

    ray job submit --working-dir . -- python jobs/restore_archive.py \
        --manifest s3://museum/manifests/scans.parquet --output s3://museum/restored/ --config jobs/museum.yaml
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["-v", "run", *sys.argv[1:]])
