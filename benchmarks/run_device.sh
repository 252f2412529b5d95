#!/usr/bin/env bash
# Runs the benchmarks on a lent accelerator machine's CPU (a quiet 16-core box), pinned to 2 threads.
# The reference libraries travel as plain copies in .benchlibs/ (see docs/benchmarks.md); the GPU is hidden.
# Usage: bash benchmarks/run_device.sh OUTDIR [quick|full]
# Prepare .benchlibs/ once on the machine where benchmarks/install.sh ran (pure-Python packages):
#   sp=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); mkdir -p .benchlibs
#   for d in pyhessian hessian_eigenthings curvlinops backpack unfoldNd einconv; do cp -r "$sp/$d" .benchlibs/; done
#   echo /.benchlibs/ >> .git/info/exclude
set -uo pipefail
out=${1:?output directory}; mode=${2:-quick}
export PYTHONPATH="$PWD/.benchlibs:$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 CUDA_VISIBLE_DEVICES=""
python3 -c "import torch, sklearn, scipy, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'scipy', scipy.__version__)"
nproc; uptime; lscpu | grep -i "model name"
filter() { grep -v -e "GPU available" -e "TPU available" -e "litlogger" -e "max_steps=" -e "UserWarning" -e "warnings.warn" -e "run_backward"; }
if [ "$mode" = quick ]; then
  timeout 120 python3 benchmarks/bench_monitor.py --quick --json "$out/monitor.json" 2>&1 | filter | tee "$out/monitor.log"
  timeout 200 python3 benchmarks/bench_engine.py --quick --json "$out/engine.json" 2>&1 | filter | tee "$out/engine.log"
else
  timeout 150 python3 benchmarks/bench_monitor.py --json "$out/monitor.json" 2>&1 | filter | tee "$out/monitor.log"
  timeout 420 python3 benchmarks/bench_engine.py --repeats 3 --json "$out/engine.json" 2>&1 | filter | tee "$out/engine.log"
fi
uptime
