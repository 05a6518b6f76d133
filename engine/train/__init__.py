"""Training: the DeepSpeed loop and the components it is wired from.

    trainer.py      the setup every training job shares: resume agreement, process group,
                    data, model, DeepSpeed engine (``Trainer.build``)
    loop.py         ``pretrain``: the loop, read top to bottom
    step.py         one optimizer step: micro-batches, the non-finite guard, the update
    parallel.py     ZeRO-3 wiring, named optimizer groups, the engine (``ParallelModel``)
    optim.py        the GDES-aware parameter groups and the learning-rate schedule
    logger.py       the step logger (window, all-reduce, metrics.jsonl, TensorBoard, console)
    metrics.py      FLOPs and MFU, peak memory, the embedding-similarity statistic
    checkpoint.py   checkpoints written by every rank, marked complete; the train state
    data.py         the data pipeline's loader with the run's settings
    distributed.py  process groups under any launcher
    preemption.py   SIGUSR1/SIGTERM: stop at a step boundary, together
    export.py       a checkpoint as Hugging Face folders; universal checkpoints
    bench.py        ``dv3 bench train``
"""
