"""Helpers the tests share (not tests themselves): the checkout's path, and builders by topic.

    runs.py     real `dv3 pretrain` processes on 1 or 2 CPU ranks, and what they wrote
    models.py   small RTD models and per-rank batches (the ZeRO-3 workers use them too)
    slurm.py    the local two-node SLURM cluster and the commands that talk to it
    data.py     small real corpora, a small tokenizer and prepared datasets for the data tests
    disk.py     a real small or read-only filesystem (tmpfs) for full-disk and unwritable-output tests
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
