"""Adam vs ClippedAdam (absolute and relative clip) vs GD: is the instability restored, and does it help?

The paper's claim 6: Adam suppresses edge-of-stability instabilities (its denominator sqrt(v_hat)
grows with the gradients); clipping the denominator from above (Clipped-Ada,
``ClippedAdam(mode="upper")``) restores them, and that improves generalization.

For each model (the digits MLP 64-200-200-10 tanh and the ``SmallCNN`` 16/32 channels, both with
MSE on one-hot targets), seed (data split and initialisation) and Adam-family lr, this script
trains with full-batch steps, in a plain PyTorch loop (no Lightning, one thread):

* ``Adam``: ``torch.optim.Adam``, betas (0.9, 0.99);
* ``abs p99``: ClippedAdam with an absolute clip c set to the 99th percentile of sqrt(v_hat) of the
  Adam run of the same seed and lr at step ``--calibrate-step`` (an absolute c "that acts");
* ``rel q=...``: ClippedAdam with the relative clip ``clip_quantile=q`` (``--quantiles``) and
  ``clip_warmup=--warmup``;
* ``GD``: ``torch.optim.SGD`` without momentum at ``--gd-lr`` (its own lr: at the Adam lrs GD
  barely moves in this step budget).

Every ``--every`` steps it measures the stability ratio on the full training loss: for the Adam
family the preconditioned sharpness lambda_max(P^-1/2 H P^-1/2) (P from
``lightning_rpe.stability.adam_preconditioner``, the clipped denominator for ClippedAdam) over
38 / lr; for GD lambda_max(H) / (2 / lr). At the end: lambda_max(H) of the training loss (float64
Lanczos, tol 1e-6), test accuracy on the 797 held-out digits, and, for ClippedAdam, the mean over
the measurements of the fraction of coordinates whose denominator the clip replaced.

A run whose training loss becomes non-finite or exceeds 1e3 is stopped and counted as diverged.

    python examples/clipped_adam_sweep.py --out /tmp/clipped_sweep           # the full sweep
    python examples/clipped_adam_sweep.py --smoke --out /tmp/clipped_smoke   # seconds
    python examples/clipped_adam_sweep.py --out /tmp/all --merge /tmp/a/results.json /tmp/b/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import final_sharpness, markdown_table, mean_std, write_results

from lightning_rpe.curvature import HessianOperator, PreconditionedOperator, eigenpairs
from lightning_rpe.data import DigitsDataModule
from lightning_rpe.models import MLPClassifier, RPEClassifier, SmallCNN
from lightning_rpe.optim import ClippedAdam
from lightning_rpe.stability import adam_preconditioner

BETAS = (0.9, 0.99)
DIVERGED_LOSS = 1e3


def make_model(name: str, seed: int) -> RPEClassifier:
    torch.manual_seed(seed)
    if name == "mlp":
        return MLPClassifier(hidden=(200, 200), loss="mse")
    return SmallCNN(channels=(16, 32), loss="mse")


def sqrt_vhat_quantile(opt: torch.optim.Optimizer, q: float) -> float:
    """q-quantile (inverted CDF) of sqrt(v_hat) over all coordinates of an Adam optimizer."""
    roots = []
    for group in opt.param_groups:
        beta2 = group["betas"][1]
        for p in group["params"]:
            s = opt.state[p]
            roots.append((s["exp_avg_sq"] / (1 - beta2 ** float(s["step"]))).sqrt().reshape(-1))
    x = torch.cat(roots)
    return float(x.kthvalue(max(1, math.ceil(q * x.numel()))).values)


def stability_ratio(model: RPEClassifier, opt: torch.optim.Optimizer, batch: Any, lr: float) -> float:
    """Preconditioned (Adam family) or plain (GD) sharpness over the optimizer's threshold."""
    op = HessianOperator(model, lambda m, b: m.compute_loss(b), [batch])
    if isinstance(opt, torch.optim.SGD):
        res = eigenpairs(op, k=1, tol=1e-3, generator=torch.Generator().manual_seed(0))
        return float(res.eigenvalues[0]) / (2.0 / lr)
    pre = adam_preconditioner(opt)
    assert pre is not None
    op_p = PreconditionedOperator(op, op.flatten(pre))
    res = eigenpairs(op_p, k=1, tol=1e-3, generator=torch.Generator().manual_seed(0))
    beta1 = BETAS[0]
    return float(res.eigenvalues[0]) / ((2 + 2 * beta1) / ((1 - beta1) * lr))


def run(model_name: str, arm: str, lr: float, seed: int, args: argparse.Namespace, clip: float | None = None,
        quantile: float | None = None) -> dict[str, Any]:
    data = DigitsDataModule(n_train=1000, seed=seed)
    data.setup()
    train, test = data.full_train_batch(), data.full_test_batch()
    model = make_model(model_name, seed)
    params = list(model.parameters())
    if arm == "GD":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr)
    elif arm == "Adam":
        opt = torch.optim.Adam(params, lr=lr, betas=BETAS)
    elif quantile is None:
        opt = ClippedAdam(params, lr=lr, betas=BETAS, clip=clip, mode="upper")
    else:
        opt = ClippedAdam(params, lr=lr, betas=BETAS, clip_quantile=quantile, clip_warmup=args.warmup, mode="upper")
    steps = args.steps[model_name]
    ratios: list[float] = []
    fractions: list[float] = []
    calibrated = math.nan
    diverged = False
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = model.compute_loss(train)
        value = float(loss.detach())
        if not math.isfinite(value) or value > DIVERGED_LOSS:
            diverged = True
            break
        loss.backward()
        opt.step()
        if arm == "Adam" and step == args.calibrate_step:
            calibrated = sqrt_vhat_quantile(opt, 0.99)
        if step % args.every == 0 or step == steps:
            r = stability_ratio(model, opt, train, lr)
            if math.isfinite(r):
                ratios.append(r)
            if isinstance(opt, ClippedAdam):
                st = opt.clip_statistics()[0]
                if st.active:
                    fractions.append(st.fraction)
    with torch.no_grad():
        final_loss = float(model.compute_loss(train))
    diverged = diverged or not math.isfinite(final_loss) or final_loss > DIVERGED_LOSS
    if diverged:
        lam, acc = math.nan, math.nan
    else:
        lam = final_sharpness(model, train)
        with torch.no_grad():
            acc = float((model(test[0]).argmax(1) == test[1]).float().mean())
    return {
        "model": model_name, "arm": arm, "lr": lr, "seed": seed, "clip": clip, "quantile": quantile,
        "diverged": diverged, "steps_done": step, "final_loss": final_loss, "lambda_max": lam, "test_acc": acc,
        "max_ratio": max(ratios) if ratios else math.nan,
        "frac_ratio_above_1": sum(r > 1.0 for r in ratios) / len(ratios) if ratios else math.nan,
        "clip_fraction": statistics.fmean(fractions) if fractions else math.nan,
        "calibrated_p99": calibrated, "seconds": time.perf_counter() - t0,
    }


def summarize(results: list[dict[str, Any]]) -> str:
    keys: list[tuple[str, float, str]] = []
    for r in results:
        k = (r["model"], r["lr"], r["arm"])
        if k not in keys:
            keys.append(k)
    rows = []
    for model_name, lr, arm in keys:
        rs = [r for r in results if (r["model"], r["lr"], r["arm"]) == (model_name, lr, arm)]
        ok = [r for r in rs if not r["diverged"]]
        rows.append([
            model_name, f"{lr:g}", arm, f"{len(rs) - len(ok)}/{len(rs)}",
            mean_std([r["lambda_max"] for r in ok]), mean_std([r["max_ratio"] for r in ok]),
            mean_std([r["frac_ratio_above_1"] for r in ok]), mean_std([r["clip_fraction"] for r in ok]),
            mean_std([r["test_acc"] for r in ok]) if len(ok) < 2 else
            f"{statistics.fmean(r['test_acc'] for r in ok):.4f} ± {statistics.stdev(r['test_acc'] for r in ok):.4f}",
        ])
    header = ["model", "lr", "run", "diverged", "final λ_max", "max ratio", "frac. ratio > 1", "frac. clipped",
              "test acc"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.005, 0.01])
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.1, 0.5, 0.9, 0.99])
    p.add_argument("--warmup", type=int, default=0, help="clip_warmup of the relative clip (steps)")
    p.add_argument("--mlp-steps", type=int, default=800)
    p.add_argument("--cnn-steps", type=int, default=400)
    p.add_argument("--every", type=int, default=50, help="stability-ratio measurement interval (steps)")
    p.add_argument("--calibrate-step", type=int, default=200, help="Adam step at which abs p99 is read")
    p.add_argument("--gd-lr", type=float, default=0.2)
    p.add_argument("--no-abs", action="store_true", help="skip the absolute-clip arm")
    p.add_argument("--no-gd", action="store_true", help="skip the GD arm")
    p.add_argument("--smoke", action="store_true", help="tiny run (seconds) for the test suite")
    p.add_argument("--merge", type=Path, nargs="+", help="only rebuild the table from these results.json files")
    args = p.parse_args(argv)
    if args.merge:
        merged = [r for f in args.merge for r in json.loads(f.read_text())]
        write_results(args.out, f"ClippedAdam sweep: merged from {[str(f) for f in args.merge]}", summarize(merged),
                      merged)
        return 0
    if args.smoke:
        args.models, args.seeds, args.lrs, args.quantiles = ["mlp"], [0], [0.005], [0.9]
        args.mlp_steps, args.cnn_steps, args.every, args.calibrate_step, args.warmup = 12, 12, 6, 6, 3
    args.steps = {"mlp": args.mlp_steps, "cnn": args.cnn_steps}
    torch.set_num_threads(1)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for model_name in args.models:
        for seed in args.seeds:
            for lr in args.lrs:
                adam = run(model_name, "Adam", lr, seed, args)
                arms = [adam]
                if not args.no_abs:
                    arms.append(run(model_name, "abs p99", lr, seed, args, clip=adam["calibrated_p99"]))
                arms += [run(model_name, f"rel q={q:g}", lr, seed, args, quantile=q) for q in args.quantiles]
                for r in arms:
                    print(json.dumps(r), flush=True)
                results += arms
            if not args.no_gd:
                results.append(run(model_name, "GD", args.gd_lr, seed, args))
                print(json.dumps(results[-1]), flush=True)
    table = summarize(results)
    header = (f"ClippedAdam sweep: models {args.models}, seeds {args.seeds}, lrs {args.lrs}, quantiles "
              f"{args.quantiles}, warm-up {args.warmup}, steps {args.steps}, every {args.every}, GD lr {args.gd_lr}; "
              f"{time.perf_counter() - t0:.0f} s wall, 1 torch thread")
    write_results(args.out, header, table, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
