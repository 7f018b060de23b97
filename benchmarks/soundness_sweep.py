"""Soundness sweep: do our IBP, CROWN and α-CROWN bounds contain the network's outputs on the ball?

For small networks (MLP, cnn3, narrow CNN-7), random and briefly trained, with BatchNorm in train and
eval mode, at several ε, this samples points uniformly in the ball ∩ [0, 1], adds PGD points that
attack every logit difference, and counts the points whose margin z_j = f_y − f_j falls below our
IBP, CROWN or α-CROWN (both modes: the final slopes, every layer's) lower bound (a violation: the
bound would be wrong). Certified points (``certify``,
float64) are also attacked with PGD-40: none may fall.

    python benchmarks/soundness_sweep.py [--samples 500] [--out benchmarks/results/soundness.json]

Prints one row per configuration and the totals; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ccdist_plugin.attacks import pgd_attack
from ccdist_plugin.bounds import (
    AlphaCrownSettings,
    alpha_crown_margin_lower_bound,
    certify,
    crown_margin_lower_bound,
    margin_lower_bound,
    with_batch_statistics,
)
from ccdist_plugin.models import cnn3, cnn7, mlp
from ccdist_plugin.soundness import briefly_trained, worst_margins


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(d.target)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=500, help="uniform samples per input")
    ap.add_argument("--inputs", type=int, default=16, help="test inputs per configuration")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x_all, y_all = digits()
    g = torch.Generator().manual_seed(0)
    rows, t0 = [], time.time()
    builders = {
        "mlp": lambda: mlp(1, 8, 10, width=32, depth=2, batch_norm=True, mean=[0.3], std=[0.4]),
        "cnn3": lambda: cnn3(1, 8, 10, width=32, channels=(8, 16), mean=[0.3], std=[0.4]),
        "cnn7": lambda: cnn7(3, 16, 10, width=32, channels=(4, 4, 8, 8, 8)),
    }
    for name, build in builders.items():
        x_src = x_all
        if name == "cnn7":
            x_src = nn.functional.interpolate(x_all, size=16).repeat(1, 3, 1, 1)
        for eps in (0.01, 0.05, 0.1):
            for state in ("random", "trained"):
                torch.manual_seed(len(rows))
                model = build()
                if state == "trained":
                    briefly_trained(model, x_src[:1000], y_all[:1000], eps, steps=40)
                else:
                    model.train()
                    with torch.no_grad():
                        model(x_src[:64])
                for mode in ("eval", "train"):
                    x, y = x_src[1200 : 1200 + args.inputs], y_all[1200 : 1200 + args.inputs]
                    model.train(mode == "train")
                    ref = with_batch_statistics(model, x) if mode == "train" else copy.deepcopy(model).eval()
                    z_ibp = margin_lower_bound(model, x, y, eps).detach()
                    z_crown = crown_margin_lower_bound(ref, x, y, eps)
                    worst, points = worst_margins(ref, x, y, eps, args.samples, g)
                    tol = 1e-5
                    v_ibp = int((z_ibp > worst + tol).any(1).sum())
                    v_crown = int((z_crown > worst + tol).any(1).sum())
                    v_alpha = {}
                    for layers in ("final", "all"):
                        kwargs = AlphaCrownSettings(layers=layers).bound_kwargs()
                        z_alpha = alpha_crown_margin_lower_bound(ref, x, y, eps, **kwargs)
                        v_alpha[f"alpha_{layers}_violations"] = int((z_alpha > worst + tol).any(1).sum())
                    cert = certify(ref, x, y, eps, method="crown")
                    fell = 0
                    if cert.certified.any():
                        xc, yc = x[cert.certified], y[cert.certified]
                        x_adv = pgd_attack(ref, xc, yc, eps, steps=40, step_size=2.5 * eps / 40, restarts=2)
                        with torch.no_grad():
                            fell = int((ref(x_adv).argmax(1) != yc).sum())
                    row = dict(
                        model=name, eps=eps, state=state, bn_mode=mode, points=points,
                        ibp_violations=v_ibp, crown_violations=v_crown, **v_alpha,
                        certified=int(cert.certified.sum()), certified_attacked=fell,
                    )  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    total = sum(r["points"] for r in rows)
    bad = sum(
        sum(v for k, v in r.items() if k.endswith("violations")) + r["certified_attacked"] for r in rows
    )
    summary = dict(configurations=len(rows), points=total, violations=bad, seconds=round(time.time() - t0, 1))
    print("TOTAL", json.dumps(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
