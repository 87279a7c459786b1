#!/usr/bin/env bash
# The runs behind the accuracy figures in docs/arena.md. Each line is one `ravine compare`;
# results land under ${OUT:-ravine-out/accuracy}/<name>/ (report.html, results.csv/json).
# One run at a time (--jobs 1) so that a shared machine keeps a core for others.
set -euo pipefail
OUT=${OUT:-ravine-out/accuracy}
run() { name=$1; shift; echo "== $name: ravine compare $*"; /usr/bin/time -f "$name: %e s wall, %U s user" \
        ravine compare --jobs 1 --out "$OUT/$name" "$@" | tail -n 4; }

# Budget "small", all seven seed optimizers, the tasks that are cheap enough for it
run logreg-small  --task mnist1d-logreg --budget small
run cnn-small     --task mnist1d-cnn    --budget small
run digits-mlp    --task digits-mlp     --budget small
run digits-cnn    --task digits-cnn     --budget small
# The recurrent models cost 10-60x more per step on CPU: fewer optimizers
run gru-small     --task mnist1d-gru    --budget small -o momentum,rmsprop,adam
run charlm-gru    --task charlm-gru     --budget small -o momentum,adam,adamw
run charlm-tf     --task charlm-transformer --budget small -o adam,adamw
# Longer training at one fixed setting, to set beside the MNIST-1D paper's figures
run mlp-long      --task mnist1d-mlp    --mode tuned -o "adam(lr=0.003)" --epochs 60 --seeds 3
run cnn-long      --task mnist1d-cnn    --mode tuned -o "adam(lr=0.003)" --epochs 50 --seeds 3
run logreg-long   --task mnist1d-logreg --mode tuned -o "adam(lr=0.01)"  --epochs 60 --seeds 3
run gru-long      --task mnist1d-gru    --mode tuned -o "adam(lr=0.003)" --epochs 40 --seeds 1
