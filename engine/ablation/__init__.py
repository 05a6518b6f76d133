"""``dv3 ablate``: the DeBERTaV3 paper's embedding-sharing ablation (ES vs NES vs GDES), side by side.

    dv3 ablate --output-dir runs/ablation                     # tiny preset, multilingual default corpus
    dv3 ablate --output-dir runs/ab --model.preset xsmall --data.dirs shards/ --train.steps 20000
    dv3 ablate --output-dir runs/ab --print-commands          # the equivalent pretrain commands (SLURM too)
    dv3 ablate --report runs/ablation                         # rebuild report.md and the plots

The stages, each skipped when already done (so a re-run continues where the last one stopped):

1. data: unless ``--data.dirs`` is given, ``dv3 data prepare`` of the embedded default corpus
   into ``OUTPUT/data/``;
2. train: one ordinary ``dv3 pretrain`` run per sharing mode in ``OUTPUT/runs/<mode>``, same
   config, seed, data and schedule, ``--resume auto`` (a finished run is skipped, an
   interrupted one resumes); the runs can as well be trained elsewhere (``--print-commands``);
3. evaluate: ``engine.ablation.evaluate`` (Table 1 statistic, held-out RTD and MLM quality, a
   downstream fine-tune over several seeds), cached in ``OUTPUT/runs/<mode>/ablation_eval.json``;
4. report: ``engine.ablation.report`` writes ``report.md``, ``ablation.json`` and the PNG plots.

    settings.py   what the runs share, the arguments that reproduce them, the file names
    run.py        stages 1 and 2
    evaluate.py   stage 3
    report.py     stage 4
    cli.py        the ``dv3 ablate`` command
"""
