# dv3 ablate trains these runs one after another; any of them can run elsewhere instead.

# data (the embedded default corpus; skipped by dv3 ablate when already prepared)
dv3 data prepare --output runs/ablation/data/multilingual-v6000-s64 --default-corpus multilingual --vocab-size 6000 --seq-len 64 --validation-fraction 0.05 --threads 2

# es
dv3 pretrain --config configs/demo_cpu.yaml --log.embedding-similarity-interval 40 --data.dirs runs/ablation/data/multilingual-v6000-s64 --rtd.sharing es --train.steps 800 --train.seed 0 --output-dir runs/ablation/runs/es --resume auto
torchrun --nproc_per_node 2 -m engine.cli pretrain --config configs/demo_cpu.yaml --log.embedding-similarity-interval 40 --data.dirs runs/ablation/data/multilingual-v6000-s64 --rtd.sharing es --train.steps 800 --train.seed 0 --output-dir runs/ablation/runs/es --resume auto
dv3 slurm submit pretrain --run-dir runs/ablation/runs/es --job-name dv3-ablate-es -- --config configs/demo_cpu.yaml --log.embedding-similarity-interval 40 --data.dirs runs/ablation/data/multilingual-v6000-s64 --rtd.sharing es --train.steps 800 --train.seed 0

# nes
dv3 pretrain --config configs/demo_cpu.yaml --log.embedding-similarity-interval 40 --data.dirs runs/ablation/data/multilingual-v6000-s64 --rtd.sharing nes --train.steps 800 --train.seed 0 --output-dir runs/ablation/runs/nes --resume auto
torchrun --nproc_per_node 2 -m engine.cli pretrain --config configs/demo_cpu.yaml --log.embedding-similarity-interval 40 --data.dirs runs/ablation/data/multilingual-v6000-s64 --rtd.sharing nes --train.steps 800 --train.seed 0 --output-dir runs/ablation/runs/nes --resume auto
dv3 slurm submit pretrain --run-dir runs/ablation/runs/nes --job-name dv3-ablate-nes -- --config configs/demo_cpu.yaml --log.embedding-similarity-interval 40 --data.dirs runs/ablation/data/multilingual-v6000-s64 --rtd.sharing nes --train.steps 800 --train.seed 0

# gdes
dv3 pretrain --config configs/demo_cpu.yaml --log.embedding-similarity-interval 40 --data.dirs runs/ablation/data/multilingual-v6000-s64 --rtd.sharing gdes --train.steps 800 --train.seed 0 --output-dir runs/ablation/runs/gdes --resume auto
torchrun --nproc_per_node 2 -m engine.cli pretrain --config configs/demo_cpu.yaml --log.embedding-similarity-interval 40 --data.dirs runs/ablation/data/multilingual-v6000-s64 --rtd.sharing gdes --train.steps 800 --train.seed 0 --output-dir runs/ablation/runs/gdes --resume auto
dv3 slurm submit pretrain --run-dir runs/ablation/runs/gdes --job-name dv3-ablate-gdes -- --config configs/demo_cpu.yaml --log.embedding-similarity-interval 40 --data.dirs runs/ablation/data/multilingual-v6000-s64 --rtd.sharing gdes --train.steps 800 --train.seed 0

# then evaluate and report (finished runs are not trained again):
dv3 ablate --output-dir runs/ablation --config configs/demo_cpu.yaml --threads 2
