"""How far `transferlab rank` can be trusted: its subsample order against full-data probes.

1. ``rank_candidates`` on a stratified subsample (``--per-class``, default 20): LogME and the
   L-BFGS probe fitted on the subsample, scored on validation; timed.
2. For each candidate, the same L-BFGS probe fitted on the whole training split (through the
   feature cache; a study that extracted it makes this a cache read), scored on validation.
3. Kendall tau between the subsample's orders (LogME; subsample probe) and the full probes' order.

``--train-subset N`` makes "the whole training split" a seeded N-image pool (a stand-in for the
full 45,000 when time is short; the study of issue 14 used the same pool, so its cache serves).

Usage:
    TRANSFERLAB_CACHE_DIR=/tmp/tl-cache nice -n 5 python benchmarks/rank_tau.py \\
        --data-dir ../shared/datasets --train-subset 10000 --out /tmp/rank_tau.json \\
        --candidates timm:tf_efficientnet_lite0@128,timm:tf_efficientnet_lite0@224
"""

from __future__ import annotations

import argparse
import json
import logging
import time

log = logging.getLogger("rank_tau")


def main() -> None:
    from scipy.stats import kendalltau

    from transferlab.data.load import load_data
    from transferlab.distributed import init_distributed
    from transferlab.studies.rank import (
        candidate_config,
        candidate_setup,
        format_rank_table,
        parse_candidates,
        probe_accuracy,
        rank_candidates,
        split_of,
    )

    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--candidates", required=True)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--out", default="rank_tau.json")
    a = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    overrides = {
        "data": {"data_dir": a.data_dir, "train_subset": a.train_subset},
        "run": {"progress": False, "device": "cpu"},
    }
    cands = parse_candidates(a.candidates)
    t0 = time.perf_counter()
    rows = rank_candidates(cands, overrides, per_class=a.per_class)
    rank_s = time.perf_counter() - t0
    print(format_rank_table(rows), flush=True)
    ds = load_data(candidate_config(cands[0], overrides))
    env = init_distributed("cpu")
    full = {}
    for c in cands:
        t1 = time.perf_counter()
        st = candidate_setup(c, ds, overrides, env)
        x, y, _ = split_of(st, ds, "train", env)
        xv, yv, _ = split_of(st, ds, "val", env)
        acc, l2 = probe_accuracy(x, y, xv, yv, len(ds.classes))
        full[c.label] = {
            "val_acc": round(acc, 4),
            "l2": l2,
            "n_train": len(y),
            "seconds": round(time.perf_counter() - t1, 1),
        }
        log.info("%s: full probe val acc %.4f (l2 %g) on %d images", c.label, acc, l2, len(y))
    labels = [r.candidate for r in rows]
    full_acc = [full[k]["val_acc"] for k in labels]
    tau_logme = kendalltau([r.logme for r in rows], full_acc)
    tau_probe = kendalltau([r.probe_val_acc for r in rows], full_acc)
    result = {
        "rank_seconds": round(rank_s, 1),
        "per_class": a.per_class,
        "train_subset": a.train_subset,
        "rows": [r.to_dict() for r in rows],
        "full": full,
        "kendall_tau_logme_vs_full": round(float(tau_logme.statistic), 3),
        "kendall_tau_logme_p": round(float(tau_logme.pvalue), 3),
        "kendall_tau_subprobe_vs_full": round(float(tau_probe.statistic), 3),
        "kendall_tau_subprobe_p": round(float(tau_probe.pvalue), 3),
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        "| candidate | LogME (20/class) | probe val acc (20/class) | full-pool probe val acc | "
        "img/s |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.candidate} | {r.logme:.4f} | {r.probe_val_acc:.4f} | "
            f"{full[r.candidate]['val_acc']:.4f} | "
            f"{r.extract_img_s:.1f} |"
        )
    print(
        f"rank time {rank_s:.0f} s; Kendall tau LogME vs full "
        f"{result['kendall_tau_logme_vs_full']} "
        f"(p {result['kendall_tau_logme_p']}), subsample probe vs full "
        f"{result['kendall_tau_subprobe_vs_full']} "
        f"(p {result['kendall_tau_subprobe_p']})"
    )


if __name__ == "__main__":
    main()
