"""``transferlab rank``: which backbone, at which input size, suits this data, before training.

Per candidate (``MODEL`` or ``MODEL@SIZE``), on a stratified subsample of the training split
(``per_class`` images per class, nested like a study's subsets) and on the full validation split:

1. features through the feature cache, with the experiment's own plan and extraction
   (``experiment._plan``, ``features.pipeline.split_features``); the subsample is cached under
   its own split name (``train-pc20-s0``), never under the whole training split's key;
2. LogME on the subsample's features (features/logme.py; no hyperparameters);
3. the L-BFGS linear probe (features/probe.py ``lbfgs_logreg``) fitted on the subsample, its L2
   picked on validation, scored on validation;
4. cost: extraction img/s measured here, forward MACs per image (torch.utils.flop_counter),
   parameters, and the estimated time to extract the whole data set at that speed.

Rows are sorted by LogME; the Pareto front is over (estimated extraction time, LogME).

Usage:
    rows = rank_candidates(parse_candidates("timm:tf_efficientnet_lite0@128,resnet18"),
                           {"data": {"data_dir": "../shared/datasets"}}, per_class=20)
    print(format_rank_table(rows))
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from transferlab.config import config_from_dict, merge_dicts
from transferlab.data.load import load_data
from transferlab.data.subsets import class_counts, select_per_class, subset_split
from transferlab.distributed import init_distributed
from transferlab.errors import UserError
from transferlab.experiment import _plan
from transferlab.features import cache as fcache
from transferlab.features import pipeline as fp
from transferlab.features.logme import logme
from transferlab.features.pipeline import split_cache_key
from transferlab.features.probe import L2_GRID, lbfgs_logreg
from transferlab.models.registry import build_model, resolve_name
from transferlab.studies.costs import forward_macs, inference_img_s
from transferlab.studies.report import pareto
from transferlab.validate import MAX_IMAGE_SIZE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A backbone and the input side it runs at (0 = the weights' own)."""

    model: str
    image_size: int = 0

    @property
    def label(self) -> str:
        return f"{self.model}@{self.image_size}" if self.image_size else self.model


@dataclass(frozen=True)
class RankRow:
    """One candidate's scores and costs."""

    candidate: str
    model: str
    image_size: int
    logme: float
    probe_val_acc: float
    probe_l2: float
    extract_img_s: (
        float  # measured here (extraction of the subsample, or a timed batch on a cache hit)
    )
    speed_source: str  # "extraction", "cached extraction" (recorded in the entry) or "timed batch"
    macs: int  # forward MACs per image of the backbone
    params: int  # backbone parameters
    est_full_extract_s: float  # (train + val + test images) / extract_img_s
    seconds: float  # this candidate's wall time here (cache reads included)
    pareto: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_candidates(text: str) -> list[Candidate]:
    """``"timm:tf_efficientnet_lite0@128,resnet18"`` -> candidates (checked names and sizes)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, size = part.partition("@")
        if not name.strip():
            raise UserError(f"candidate {part!r}: name a model before the @ (e.g. resnet18@224)")
        if name == "cnn":
            raise UserError(
                "rank compares pretrained backbones; the cnn has no pretrained features"
            )
        resolve_name(name)
        if "@" in part and not size.strip():
            raise UserError(
                f"candidate {part!r}: give a size after @ (e.g. {name or 'resnet18'}@224), or "
                "drop the @ for the model's own size"
            )
        try:
            side = int(size) if size else 0
        except ValueError:
            raise UserError(
                f"candidate {part!r}: the size after @ must be an integer (px)"
            ) from None
        if size and not 16 <= side <= MAX_IMAGE_SIZE:
            raise UserError(
                f"candidate {part!r}: the input size must be 16 to {MAX_IMAGE_SIZE} px "
                "(the --image-size range of train)"
            )
        out.append(Candidate(name, side))
    if not out:
        raise UserError(
            "--candidates is empty; give e.g. "
            "timm:tf_efficientnet_lite0@128,timm:tf_efficientnet_lite0@224"
        )
    if len({c.label for c in out}) != len(out):
        raise UserError("--candidates lists a candidate twice")
    return out


def candidate_config(cand: Candidate, overrides: dict[str, dict[str, Any]]):
    """The config of a frozen run of ``cand`` (the study's/user's flags applied)."""
    return config_from_dict(
        merge_dicts(
            overrides,
            {
                "model": {"name": cand.model, "mode": "frozen"},
                "data": {"image_size": cand.image_size, "per_class": 0},
            },
        )
    )


def probe_accuracy(
    x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, num_classes: int
) -> tuple[float, float]:
    """(best validation accuracy, its L2) of the L-BFGS probe over the probe's L2 grid."""
    x, xv = x.float(), xv.float()
    mu, sigma = x.mean(0), x.std(0)
    sigma = sigma.clamp_min(1e-3 * sigma.mean().item() + 1e-8)  # as features/probe.py does
    xs, xvs = (x - mu) / sigma, (xv - mu) / sigma
    best, init = (-1.0, 0.0), None
    for l2 in sorted(L2_GRID, reverse=True):  # strong to weak, warm-started
        w, b = lbfgs_logreg(xs, y, num_classes, l2, init=init)
        init = (w, b)
        with torch.no_grad():
            acc = (torch.addmm(b, xvs, w.t()).argmax(1) == yv).float().mean().item()
        best = max(best, (acc, l2))
    return best


def _timed_speed(model, plan, batch: int = 16) -> float:
    return inference_img_s(
        model.backbone,
        plan.image_size,
        batch,
        precision=plan.extract.precision,
        channels_last=plan.channels_last,
    )


@dataclass(frozen=True)
class Setup:
    """A candidate ready to extract: its config, model, the run's plan and the weights' hash."""

    cfg: Any
    model: Any
    plan: Any
    whash: str


def candidate_setup(cand: Candidate, ds, overrides: dict, env) -> Setup:
    """Config, model and plan of a frozen run of ``cand`` (the plan is the experiment's own)."""
    cfg = candidate_config(cand, overrides)
    model = build_model(cfg.model, num_classes=len(ds.classes)).to(env.device).eval()
    plan = _plan(cfg, model, ds, env, None)  # size, preprocessing, extraction precision
    if hasattr(ds, "set_preprocessing"):  # folder data: decode at this candidate's size
        ds.set_preprocessing(plan.preprocessing)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Setup(cfg, model, plan, fcache.weights_hash(model.backbone))


def split_of(st: Setup, ds, name: str, env):
    """(features, labels, SplitFeatures) of split ``name`` of ``ds``, exactly as a run gets them
    (features.pipeline.split_features: the cache, the plan's engine and precision)."""
    engines = fp._Engines(st.cfg, st.plan, st.model, env, st.whash, ds)
    return fp.split_features(st.cfg, st.plan, ds, name, env, engines, lambda: False)


def subsample_features(st: Setup, ds, per_class: int, seed: int, env):
    """(features, labels, (img/s, its source) or None) of the stratified subsample, via the cache.

    When the whole training split is cached (a study or a run extracted it), its rows are picked
    (the same images ``subset_split`` draws); else the subsample is extracted and cached under its
    own split name (``train-pc20-s0``), never under the whole split's key.
    """
    root = fcache.cache_root(st.cfg.run.cache_dir)
    key = split_cache_key(st.cfg, st.plan, ds, "train", st.whash)
    hit = fcache.load_entry(root, key)
    if hit is not None and hit[0]["features"].dim() == 2:
        log.info("%s: subsample picked from the cached training split", st.cfg.model.name)
        x, y = select_per_class(hit[0]["features"], hit[0]["labels"], per_class, seed)
        recorded = float(hit[1].get("img_s") or 0)  # the speed it was extracted at, if recorded
        return x, y, (recorded, "cached extraction") if recorded > 0 else None
    sub = copy.copy(ds)
    name = f"train-pc{per_class}-s{seed}"
    setattr(sub, name, subset_split(ds.train, per_class, seed))
    x, y, meta = split_of(st, sub, name, env)
    return x, y, (meta.img_s, "extraction") if meta.img_s else None


def rank_one(cand: Candidate, ds, overrides: dict, per_class: int, seed: int, env) -> RankRow:
    """Score and cost one candidate (see the module docstring)."""
    t0 = time.perf_counter()
    st = candidate_setup(cand, ds, overrides, env)
    model, plan = st.model, st.plan
    x, y, measured = subsample_features(st, ds, per_class, seed, env)
    xv, yv, _ = split_of(st, ds, "val", env)
    speed, source = measured or (_timed_speed(model, plan), "timed batch")
    score = logme(x.float(), y)
    acc, l2 = probe_accuracy(x, y, xv, yv, len(ds.classes))
    n_all = len(ds.train) + len(ds.val) + len(ds.test)
    macs = forward_macs(model.backbone, plan.image_size)
    row = RankRow(
        cand.label,
        cand.model,
        plan.image_size,
        round(score, 5),
        round(acc, 4),
        l2,
        round(speed, 1),
        source,
        macs,
        sum(p.numel() for p in model.backbone.parameters()),
        round(n_all / speed, 1),
        round(time.perf_counter() - t0, 1),
    )
    log.info(
        "%s: LogME %.4f, probe val acc %.4f (l2 %g), %.1f img/s (%s), est. full extraction %.0f s",
        row.candidate,
        row.logme,
        row.probe_val_acc,
        l2,
        speed,
        source,
        row.est_full_extract_s,
    )
    return row


def mark_pareto(rows: list[RankRow]) -> list[RankRow]:
    """Rows sorted by LogME (best first), the Pareto front over (est. extraction time, LogME)
    marked."""
    front = set(pareto([(r.est_full_extract_s, r.logme) for r in rows]))
    marked = [dataclasses.replace(r, pareto=i in front) for i, r in enumerate(rows)]
    return sorted(marked, key=lambda r: -r.logme)


def rank_candidates(
    candidates: list[Candidate],
    overrides: dict[str, dict[str, Any]],
    per_class: int = 20,
    seed: int = 0,
) -> list[RankRow]:
    """Rank ``candidates`` on this data; every bad input fails before any extraction."""
    if per_class < 1:
        raise UserError(f"--per-class must be at least 1; got {per_class}")
    cfgs = [candidate_config(c, overrides) for c in candidates]  # config errors first
    ds = load_data(cfgs[0])
    counts = class_counts(ds.train.labels)
    smallest = min(counts, key=lambda c: (counts[c], c))
    if per_class > counts[smallest]:
        raise UserError(
            f"--per-class {per_class} is larger than class {smallest}, which has "
            f"{counts[smallest]} "
            "training images"
        )
    env = init_distributed(cfgs[0].run.device)
    rows = [rank_one(c, ds, overrides, per_class, seed, env) for c in candidates]
    return mark_pareto(rows)


def format_rank_table(rows: list[RankRow]) -> str:
    """A fixed-width text table of ranked rows (Pareto-front rows starred)."""
    head = (
        f"{'rank':>4}  {'candidate':40s} {'LogME':>8} {'probe val':>9} {'img/s':>7} {'GMACs':>6} "
        f"{'params M':>8} {'est. full extract':>17}  pareto\n"
    )
    lines = [head]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"{i:>4}  {r.candidate:40s} {r.logme:8.4f} {r.probe_val_acc:9.4f} "
            f"{r.extract_img_s:7.1f} "
            f"{r.macs / 1e9:6.2f} {r.params / 1e6:8.2f} {r.est_full_extract_s / 60:14.1f} min  "
            f"{'*' if r.pareto else ''}\n"
        )
    lines.append(
        "LogME: higher suits the data better (You et al. 2021); probe: L-BFGS linear probe fitted "
        "on the "
        "subsample, L2 picked on validation; * = Pareto front over (est. extraction time, LogME).\n"
    )
    return "".join(lines)
