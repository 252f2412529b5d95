"""The floor under a warm measurement: how many products any Krylov solve from the previous vectors needs.

Run::

    python benchmarks/warm_oracle_floor.py [--steps 200] [--every 10] [--threads 1]

Same trajectory as ``bench_monitor.py`` and ``warm_start_trajectory.py``: ``MLPClassifier()``
(64-200-200-10 tanh, MSE, 55,210 parameters), full-batch GD at lr 0.05 on the first 1000 digits
training samples, a measurement every ``--every`` steps. At each measurement after the first, in
float64:

* the truth: lambda_max, v_1, lambda_min, v_min by Lanczos at ``tol=1e-10``;
* the rotation of v_1 since the previous measurement (degrees, sign-free);
* Lanczos (``workloads.oracle_lanczos``: full re-orthogonalisation) from exactly the previous
  true v_1, and the first product count after which (``max``) its largest Ritz value is within
  ``1e-3 * lambda_max`` of the truth (an *oracle*: it knows the answer, so no stopping rule stops
  earlier from this start); (``maxE``) its residual ``r`` gives ``min(r, r^2 / gap) <= 1e-3 *
  lambda_max`` with the *true* gap ``lambda_1 - lambda_2`` (the best certificate any solver can
  hold: a solver only has an estimate of the gap); (``maxR``) ``r <= 1e-3 * lambda_max`` (the
  residual rule, what the monitor's default asks of v_1, whose rotation it reports);
* the same from the previous v_min: (``min``) lambda_min within ``1e-2 * lambda_max`` (the monitor's
  ``tol_smallest``), (``minR``) its residual within that (lambda_min lies in a cluster, where the
  residual is the only certificate);
* the Rayleigh quotient of the previous v_1 (error, and ``r^2 / gap`` relative to lambda_max).

One Krylov space per end is what a warm solve from the previous vectors can use at best (one
Lanczos run over both ends shares its products between them but starts from their mixture).
Then, in the same process with float32 products (the monitor's dtype), the costs the floor is
priced at: one gradient, the graph build (``loss_and_gradient``) and one product, median of 7, and
the three floors in gradient-equivalents, ``build + (products for lambda_max + products for
lambda_min) * product``, medians over the measurements.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import DigitsGD, oracle_lanczos, product_prices  # noqa: E402


def first(history: list[tuple[torch.Tensor, torch.Tensor]], ok) -> int | None:
    """First product count m whose (theta, residual) satisfies ok, else None."""
    return next((m for m, (theta, res) in enumerate(history, start=1) if ok(theta, res)), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps-oracle", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lightning_rpe.curvature import HessianOperator, eigenpairs

    run = DigitsGD(lr=args.lr)
    model, loss_fn, (x, y) = run.model, run.loss_fn, run.batch

    prev: tuple[torch.Tensor, torch.Tensor] | None = None
    rows = []
    print(f"{'step':>4} {'lambda_max':>10} {'gap/l1':>7} {'rot deg':>8} {'RQ err':>9} {'r^2/gap':>9} "
          f"{'max':>4} {'maxE':>4} {'maxR':>4} {'min':>4} {'minR':>4}", flush=True)
    for step in range(args.steps + 1):
        if step % args.every == 0:
            m64 = copy.deepcopy(model).double()
            op = HessianOperator(m64, loss_fn, [(x.double(), y)], dtype=torch.float64)
            truth = eigenpairs(op, k=2, which="both", tol=1e-10, max_hvp=600,
                               generator=torch.Generator().manual_seed(step))
            lam = truth.eigenvalues.tolist()  # [l1, l2, lmin]
            l1, l2, lmin = lam[0], lam[1], lam[-1]
            v1, vmin = truth.eigenvectors[:, 0], truth.eigenvectors[:, -1]
            if prev is not None:
                p1, pmin = prev
                gap = l1 - l2
                rot = math.degrees(math.acos(min(1.0, abs(float(p1 @ v1)))))
                hist_max = oracle_lanczos(op.matvec, p1, args.max_steps_oracle)
                hist_min = oracle_lanczos(op.matvec, pmin, args.max_steps_oracle)
                rq, r = float(hist_max[0][0][-1]), float(hist_max[0][1][-1])
                row = {
                    "step": step, "l1": l1, "rot": rot, "rq_err": abs(rq - l1) / l1, "cert": r * r / gap / l1,
                    # the answer itself within tolerance (no certificate)
                    "m_max": first(hist_max, lambda t, e: abs(float(t[-1]) - l1) <= 1e-3 * l1),
                    # certified by r^2 / gap with the TRUE gap (the best certificate a solver can hold)
                    "m_max_eig": first(hist_max, lambda t, e: min(float(e[-1]), float(e[-1]) ** 2 / gap)
                                       <= 1e-3 * l1),
                    # certified by the residual (what the monitor's default asks of v_1)
                    "m_max_res": first(hist_max, lambda t, e: float(e[-1]) <= 1e-3 * l1),
                    "m_min": first(hist_min, lambda t, e: abs(float(t[0]) - lmin) <= 1e-2 * l1),
                    # lambda_min sits in a cluster: its certificate is the residual
                    "m_min_res": first(hist_min, lambda t, e: float(e[0]) <= 1e-2 * l1),
                }
                rows.append(row)
                print(f"{step:4d} {l1:10.4f} {gap / l1:7.4f} {rot:8.3f} {row['rq_err']:9.2e} {row['cert']:9.2e} "
                      + " ".join(f"{row[k]!s:>4}" for k in ("m_max", "m_max_eig", "m_max_res", "m_min", "m_min_res")),
                      flush=True)
            prev = (v1.clone(), vmin.clone())
        run.gd(1)

    # Prices in float32 at the final parameters, the monitor's dtype and path.
    g, build, prod = product_prices(model, loss_fn, (x, y))

    def pairs(a: str, b: str) -> list[int]:
        return [r[a] + r[b] for r in rows if r[a] is not None and r[b] is not None]

    def describe(key: str) -> str:
        vals = [r[key] for r in rows if r[key] is not None]
        missing = len(rows) - len(vals)
        return (f"median {statistics.median(vals):g}, max {max(vals)}"
                + (f" ({missing} not reached in {args.max_steps_oracle})" if missing else ""))

    print(f"\n{len(rows)} warm measurements, {args.threads} thread(s)")
    print(f"rotation of v_1 between measurements: median {statistics.median(r['rot'] for r in rows):.2f} deg, "
          f"max {max(r['rot'] for r in rows):.2f} deg")
    print(f"Rayleigh quotient of the previous v_1: error median {statistics.median(r['rq_err'] for r in rows):.1e}, "
          f"max {max(r['rq_err'] for r in rows):.1e} (relative)")
    print(f"products from the previous v_1 until lambda_max is within 1e-3 (oracle): {describe('m_max')}")
    print(f"  ... until r^2/gap <= 1e-3 lambda_max with the true gap (certified): {describe('m_max_eig')}")
    print(f"  ... until the residual <= 1e-3 lambda_max (the default's certificate for v_1): {describe('m_max_res')}")
    print(f"products from the previous v_min until lambda_min is within 1e-2 lambda_max (oracle): {describe('m_min')}")
    print(f"  ... until its residual <= 1e-2 lambda_max (certified): {describe('m_min_res')}")
    print(f"float32 prices: gradient {g * 1e3:.2f} ms, graph build {build / g:.2f}, product {prod / g:.2f} "
          f"gradient-equivalents")
    for label, a, b in (("oracle (uncertified)", "m_max", "m_min"),
                        ("eigenvalue rule, true gap", "m_max_eig", "m_min_res"),
                        ("residual rule", "m_max_res", "m_min_res")):
        n = statistics.median(pairs(a, b))
        print(f"floor of a warm measurement, {label}: {build / g:.2f} + {n:g} x {prod / g:.2f} = "
              f"{(build + n * prod) / g:.1f} gradient-equivalents (median), before any solver bookkeeping")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
