#!/usr/bin/env bash
# The main job: a short 2-rank training on real data (scikit-learn's digits) with the NUQ
# quantizer in stock hvd.DistributedOptimizer, printing loss, accuracy and bytes saved;
# then every scheme and protocol applied to one tensor per rank (bits on the wire, error).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
NP=${NP:-2}
echo "== training: mpirun -np $NP python examples/pytorch_digits.py --compression nuq --epochs 8"
mpirun -np "$NP" python examples/pytorch_digits.py --compression nuq --epochs 8
echo
echo "== every scheme on one 1M-coordinate tensor per rank: mpirun -np $NP python scripts/scheme_demo.py"
mpirun -np "$NP" python scripts/scheme_demo.py
