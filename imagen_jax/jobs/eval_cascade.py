"""`--mode=eval` for configs/cascade.py: a guidance (and SR augmentation) sweep scored by FID
and text alignment.

  python launch.py --config=configs/cascade.py:demo --workdir=runs/demo/eval --mode=eval

Imagen's Figure 4 protocol at the scale of the config: for each weight w in
eval.guidance_weights, eval.num_images held-out captions are sampled through stages
0..eval.fid_stage with stage 0's guidance set to w (the other stages keep theirs), then

  FID        Inception pool3 statistics of the samples vs eval.reference_limit held-out
             images of stage fid_stage's dataset (imagen_jax.eval.fid);
  alignment  CLIP score of samples and prompts when eval.clip names CLIP weights
             (imagen_jax.eval.clip_score), else the offline alignment score and its
             R-precision (imagen_jax.eval.alignment), trained on the train split.

With eval.aug_levels set, every weight is also crossed with every level: the SR stages
1..fid_stage sample their noise-augmented low-res input at that level (Imagen swept
0.1-0.3), given as eval.aug_level_kind "t" (a time of each stage's augmentation
schedule), "logsnr" or "sigma". Each such row records the level at stage fid_stage in all
three forms (aug_t, aug_logsnr, aug_sigma); results.json and each row's settings.json hold
every stage's.

Two reference points frame the curve: the FID between train and held-out images (a floor
no generator of this data should beat) and the alignment of real held-out pairs (the
ceiling). Outputs in WORKDIR:

  results.csv / results.md / results.json   one row per guidance weight (and aug level)
  fid_vs_alignment.png                      the Pareto curve (or fid_vs_clip.png)
  samples/guidance_W[_aug_K_L]/             every sample (PNG), a captioned grid, settings
  cascade/                                  sample.prompts through every stage (64/256/1024)
  report.md                                 all of the above on one page
  cache/                                    Inception features of the real splits and the
                                            alignment model, reused by later runs

Multi-host: run the same command on every host with launch.py's jax.distributed flags.
Each process loads the stages onto its own devices (evaluators.local_mesh), samples its
share of the captions at every sweep point (image i keeps the key of caption i, so the
samples are a single process's) and computes their features; process 0 gathers them,
scores every row, samples the cascade's prompts and writes the outputs. WORKDIR and the
stages must be on storage every host mounts.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any, Sequence

import ml_collections

from imagen_jax import cascade as cascade_lib
from imagen_jax import config_schema
from imagen_jax import multihost
from imagen_jax.data import datasets
from imagen_jax.diffusion import guidance
from imagen_jax.eval import evaluators
from imagen_jax.eval import fid as fid_lib
from imagen_jax.eval import precision_recall as pr_lib
from imagen_jax.eval import references

# The forms of an augmentation level a row records (cascade settings keys aug_<form>).
AUG_FORMS = ("t", "logsnr", "sigma")


MODE = "eval"
KINDS = ("cascade",)
SECTIONS = {"eval": "CascadeEvalSettings"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CascadeEvalSettings(evaluators.ScoringSettings):
  """config.eval of a cascade (configs/cascade.py explains the keys): the guidance sweep,
  the SR stages' augmentation-level sweep, the stage FID measures (fid_stage) on its
  dataset (data_dir "" = the stage's own), and whether to run sample.prompts through
  every stage for the report (cascade_samples)."""

  guidance_weights: tuple[float, ...]
  aug_levels: tuple[float, ...]
  aug_level_kind: str
  sr_guidance_weights: tuple[float, ...]
  fid_stage: int
  data_dir: str
  dataset: str
  source_dir: str
  train_split: str
  eval_split: str
  cascade_samples: bool

  def check(self, c: config_schema.Checker) -> None:
    weights = self.guidance_weights
    if not weights or not all(config_schema.is_number(w) and w >= 0 for w in weights):
      raise c.error("guidance_weights", "must list weights >= 0",
                    fix=f"pass e.g. {c.flag('guidance_weights')}='(1.0, 3.0, 5.0)'")
    super().check(c)
    num_stages = len(c.root.stages)
    stage = c.integer("fid_stage")
    if not 0 <= stage < num_stages:
      raise c.error("fid_stage", f"names a stage, so must lie in [0, {num_stages - 1}]")
    form = c.one_of("aug_level_kind", guidance.AUG_LEVEL_FORMS)
    levels = self.aug_levels
    if not isinstance(levels, (tuple, list)) or not all(
        cascade_lib.aug_value_ok(v, form) for v in levels):
      raise c.error("aug_levels", "must list augmentation levels, each "
                    f"{cascade_lib.AUG_RANGES[form]} ({c.key('aug_level_kind')}={form!r})",
                    fix=f"pass e.g. {c.flag('aug_levels')}='(0.1, 0.2, 0.3)' (times t), "
                        "or () for each stage's own level")
    if levels and stage == 0:
      raise c.error("fid_stage", f"an augmentation sweep ({c.key('aug_levels')}="
                    f"{tuple(levels)}) acts on the SR stages, but FID is measured on the "
                    "base stage, which they do not touch",
                    fix=f"pass {c.flag('fid_stage')}=1 (or {c.flag('aug_levels')}='()')")
    sr_weights = self.sr_guidance_weights
    if not isinstance(sr_weights, (tuple, list)) or not all(
        config_schema.is_number(w) and w >= 0 for w in sr_weights):
      raise c.error("sr_guidance_weights", "must list weights >= 0 (() = no SR sweep)")
    if sr_weights and stage == 0:
      raise c.error("fid_stage", f"an SR guidance sweep ({c.key('sr_guidance_weights')}) "
                    "acts on the SR stages, but FID is measured on the base stage",
                    fix=f"pass {c.flag('fid_stage')}=1 (or {c.flag('sr_guidance_weights')}='()')")
    for name in ("data_dir", "source_dir", "train_split", "eval_split"):
      c.string(name)
    if c.string("dataset") and self.dataset not in datasets.DATASETS:
      raise c.error("dataset", f"must be '' (the stage's own) or one of {datasets.DATASETS}")
    if self.dataset == "image_text_folder" and not os.path.isdir(
        os.path.expanduser(self.source_dir)):
      raise c.error("source_dir", "must be the folder the reference dataset was built from "
                    f"({c.key('dataset')}='image_text_folder')",
                    fix=f"pass {c.flag('source_dir')}=/path/to/coco (with annotations/ and "
                        "val2014/), built first with --mode=build_data")
    c.boolean("cascade_samples")


def reference_data(stage_data: ml_collections.ConfigDict, ec: Any) -> ml_collections.ConfigDict:
  """The data section FID and the text metric compare against: stage fid_stage's own, with
  the eval section's dataset, source_dir, data_dir and splits where set (the COCO protocol
  scores emoji-trained or any other stages against COCO's validation images)."""
  data_cfg = ml_collections.ConfigDict(stage_data.to_dict())
  if ec.get("dataset"):
    data_cfg.dataset = ec.dataset
  for key in ("source_dir", "data_dir", "train_split", "eval_split"):
    if ec.get(key):
      data_cfg[key] = os.path.expanduser(ec[key]) if key.endswith("dir") else ec[key]
  return data_cfg


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  ec = config.eval
  os.makedirs(workdir, exist_ok=True)
  cache_dir = ec.cache_dir or os.path.join(workdir, "cache")
  fid_stage = int(ec.fid_stage)
  main = multihost.is_main()  # scores, prints and writes the outputs
  # Every process loads the same stages (restores may synchronise processes), though
  # only process 0 samples the cascade's prompts through all of them.
  n_load = len(config.stages) if ec.cascade_samples else fid_stage + 1
  cascade = cascade_lib.Cascade.from_workdirs(
      list(config.stages)[:n_load], weights=config.weights,
      mesh=evaluators.local_mesh(config.mesh))
  stage = cascade.stages[fid_stage]
  data_cfg = reference_data(stage.config.data, ec)
  timings: dict[str, float] = {}

  began = time.perf_counter()
  context = evaluators.load_context(ec, data_cfg, cache_dir)
  ref_feats, ref_caps = context.ref_feats, context.ref_caps
  train_feats = context.train_feats
  timings["real_features_s"] = time.perf_counter() - began
  if main:
    floor = None if train_feats is None else fid_lib.feature_distance(train_feats, ref_feats)

  began = time.perf_counter()
  scorer = evaluators.text_evaluator(context, scoring=main)
  if main:
    ceiling = scorer.ceiling(context)
    protocol = evaluators.protocol(context, scorer, num_images=int(ec.num_images))
  timings["scorer_s"] = time.perf_counter() - began
  metric = scorer.name
  if main:
    print((f"reference: FID(train, held-out) = {floor:.2f} over {len(train_feats)} / "
           f"{len(ref_feats)} images; " if floor is not None else
           f"reference: {len(ref_feats)} held-out images (no train split: no FID floor); ")
          + "real held-out pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in ceiling.items()))

  prompts = references.eval_prompts(ref_caps, int(ec.num_images), int(ec.seed))
  base_settings = cascade_lib.stage_settings(config, fid_stage + 1)
  aug_kind = ec.get("aug_level_kind", "t")
  aug_levels = [float(v) for v in ec.get("aug_levels", ())]
  rows = []
  for point in sweep_points(ec.guidance_weights, aug_levels, ec.get("sr_guidance_weights", ())):
    settings = sweep_settings(base_settings, point, aug_kind)
    name, label = point.name(aug_kind), point.label(aug_kind)
    out_dir = os.path.join(workdir, "samples", name)
    began = time.perf_counter()
    out, _ = evaluators.generate_share(cascade, prompts, seed=int(ec.seed),
                                       settings=settings, num_stages=fid_stage + 1,
                                       batch_size=int(ec.batch_size), out_dir=out_dir,
                                       grid_size=int(ec.grid_size))
    sample_s = time.perf_counter() - began
    images = out.images[-1]
    feats, image_feats = evaluators.share_features(context, scorer, images)
    if not main:
      continue
    if multihost.process_count() > 1:
      images = None  # only this process's share; the scorer has image_feats
    res = stage.resolution
    stages_rec = out.settings["stages"]
    row: dict[str, Any] = {"sweep": point.sweep, "guidance": stages_rec[0]["guidance"],
                           "sr_guidance": (stages_rec[fid_stage]["guidance"]
                                           if fid_stage else None)}
    if point.aug_level is not None:
      row.update(aug_level=point.aug_level,
                 **{f"aug_{f}": stages_rec[fid_stage][f"aug_{f}"] for f in AUG_FORMS},
                 aug_stages=[dict(stage=k, **{f: stages_rec[k][f"aug_{f}"] for f in AUG_FORMS})
                             for k in range(1, fid_stage + 1)])
    precision, recall = pr_lib.precision_recall(ref_feats, feats)
    row.update({"fid": fid_lib.feature_distance(feats, ref_feats), "precision": precision,
                "recall": recall,
                **scorer.score(feats, images, prompts, image_features=image_feats),
                "num_images": len(feats), "sample_s": sample_s, "grid": os.path.relpath(
                    os.path.join(out_dir, f"grid_{res}px.png"), workdir)})
    rows.append(row)
    print(f"{label}: FID {row['fid']:.2f}, {metric} {row[metric]:.3f}"
          + (f", R-precision {row['r_precision']:.3f}" if "r_precision" in row else ""))

  if not main:
    return {"process_index": multihost.process_index()}
  cascade_out = None
  if ec.cascade_samples:
    began = time.perf_counter()
    cascade_out = cascade.generate(cascade_lib.read_prompts(config.sample),
                                   seed=int(config.sample.seed),
                                   settings=cascade_lib.stage_settings(config, n_load),
                                   batch_size=int(config.sample.batch_size),
                                   out_dir=os.path.join(workdir, "cascade"))
    timings["cascade_samples_s"] = time.perf_counter() - began

  result = {"metric": metric, "protocol": protocol, "rows": rows, "fid_floor": floor,
            "ceiling": ceiling,
            "aug_sweep": dict(kind=aug_kind, levels=aug_levels) if aug_levels else None,
            "reference_images": len(ref_feats),
            "train_images": None if train_feats is None else len(train_feats),
            "reference_data": {k: data_cfg.get(k) for k in
                               ("dataset", "source_dir", "resolution", "eval_split")},
            "fid_stage": fid_stage, "resolution": stage.resolution,
            "stages": [dict(source=s.source, step=s.step, weights=s.weights,
                            resolution=s.resolution) for s in cascade.stages],
            "timings": timings,
            "cascade": None if cascade_out is None else dict(
                grids=[f"cascade/grid_{im.shape[1]}px.png" for im in cascade_out.images],
                seconds=cascade_out.seconds, prompts=cascade_out.prompts)}
  if getattr(scorer, "path", None):
    result["alignment_model"] = dict(path=scorer.path, **scorer.model.meta)
  write_results(result, workdir)
  print(f"report: {os.path.join(workdir, 'report.md')}")
  return result


# The sweeps a cascade evaluation runs, each a curve of the Pareto plot.
SWEEPS = {
    "guidance": "the base stage's guidance weight (eval.guidance_weights), crossed with the "
                "SR stages' sampling augmentation levels (eval.aug_levels) when given",
    "sr_guidance": "the SR stages' guidance weight (eval.sr_guidance_weights), the base "
                   "stage at its own weight",
}


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  """One row: which sweep, and the setting it varies (None = the stages' own)."""
  sweep: str
  guidance: float | None = None
  aug_level: float | None = None
  sr_guidance: float | None = None

  def name(self, aug_kind: str) -> str:
    """The row's sample folder."""
    if self.sweep == "sr_guidance":
      return f"sr_guidance_{self.sr_guidance:g}"
    return f"guidance_{self.guidance:g}" + (
        "" if self.aug_level is None else f"_aug_{aug_kind}_{self.aug_level:g}")

  def label(self, aug_kind: str) -> str:
    if self.sweep == "sr_guidance":
      return f"SR guidance {self.sr_guidance:g}"
    return f"guidance {self.guidance:g}" + (
        "" if self.aug_level is None else f", aug {aug_kind}={self.aug_level:g}")


def sweep_points(weights: Sequence[float], aug_levels: Sequence[float],
                 sr_weights: Sequence[float] = ()) -> list[SweepPoint]:
  """The rows: every base weight at every aug level (weights outermost; without levels,
  one row per weight), then one row per SR guidance weight."""
  rows = [SweepPoint("guidance", guidance=float(w), aug_level=lv)
          for w in weights for lv in (list(aug_levels) or [None])]
  return rows + [SweepPoint("sr_guidance", sr_guidance=float(w)) for w in sr_weights]


def sweep_settings(base: Sequence[cascade_lib.StageSettings | None], point: SweepPoint,
                   aug_kind: str) -> list[cascade_lib.StageSettings]:
  """The per-stage settings of one row: stage 0 at the point's weight, every SR stage at
  its aug level (given as aug_kind: t, logsnr or sigma) and SR guidance weight, each
  replacing the stage's own where the point sets it."""
  out = [s or cascade_lib.StageSettings() for s in base]
  if point.guidance is not None:
    out[0] = dataclasses.replace(out[0], guidance=float(point.guidance))
  if point.aug_level is not None:
    level = dict(aug_t=None, aug_logsnr=None, aug_sigma=None)
    level[f"aug_{aug_kind}"] = float(point.aug_level)
    out[1:] = [dataclasses.replace(s, **level) for s in out[1:]]
  if point.sr_guidance is not None:
    out[1:] = [dataclasses.replace(s, guidance=float(point.sr_guidance)) for s in out[1:]]
  return out


# -- outputs -------------------------------------------------------------------------------

def write_results(result: dict[str, Any], workdir: str) -> None:
  rows, metric = result["rows"], result["metric"]
  aug = [f"aug_{f}" for f in AUG_FORMS] if result.get("aug_sweep") else []
  sr = ["sr_guidance"] if result["fid_stage"] else []
  cols = ["sweep", "guidance"] + sr + aug + ["fid", "precision", "recall", metric] + (
      ["r_precision"] if metric == "alignment" else []) + ["num_images", "sample_s"]
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for r in rows:
      w.writerow([r.get(c) for c in cols])
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=2, default=float)
  protocol = result.get("protocol", {})
  label = evaluators.metric_label(protocol) if protocol else metric
  table = _markdown_table(rows, cols, {metric: label})
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write((evaluators.protocol_markdown(protocol) + "\n\n" if protocol else "") + table)
  sweep = result.get("aug_sweep")
  plot = plot_pareto(rows, metric, os.path.join(workdir, f"fid_vs_{metric}.png"),
                     floor=result["fid_floor"], ceiling=result["ceiling"].get(metric),
                     aug_kind=sweep["kind"] if sweep else None, metric_label=label)
  write_report(result, workdir, table, plot)


def _fmt(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
  return str(v)


def _markdown_table(rows: list[dict[str, Any]], cols: list[str],
                    headers: dict[str, str] | None = None) -> str:
  headers = headers or {}
  lines = ["| " + " | ".join(headers.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _series(rows: list[dict[str, Any]], aug_kind: str | None
            ) -> dict[str, list[dict[str, Any]]]:
  """The Pareto plot's curves: one per sweep; the base-guidance sweep crossed with aug
  levels gives one curve per level (over the weights), or with one weight one curve over
  the levels."""
  series: dict[str, list[dict[str, Any]]] = {}
  base = [r for r in rows if r.get("sweep", "guidance") == "guidance"]
  by_level = len({r["guidance"] for r in base}) > 1
  for r in rows:
    sweep = r.get("sweep", "guidance")
    if sweep == "sr_guidance":
      key = "SR guidance sweep"
    elif r.get("aug_level") is not None and by_level:
      key = f"guidance sweep, aug {aug_kind}={r['aug_level']:g}"
    elif r.get("aug_level") is not None:
      key = f"SR aug level sweep (guidance {r['guidance']:g})"
    else:
      key = "guidance sweep"
    series.setdefault(key, []).append(r)
  return series


def _point_text(r: dict[str, Any], aug_kind: str | None) -> str:
  if r.get("sweep") == "sr_guidance":
    return f"sr w={r['sr_guidance']:g}"
  text = f"w={r['guidance']:g}"
  if r.get("aug_level") is not None:
    text += f", {aug_kind}={r['aug_level']:g}"
  return text


def plot_pareto(rows: list[dict[str, Any]], metric: str, path: str, *,
                floor: float | None = None, ceiling: float | None = None,
                aug_kind: str | None = None, metric_label: str | None = None) -> str:
  """FID (down is better) against the text metric (right is better), one point per row
  and one curve per sweep (`_series`): Imagen's Figure 4 axes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for label, group in _series(rows, aug_kind).items():
    ax.plot([r[metric] for r in group], [r["fid"] for r in group], "o-", label=label)
  for r in rows:
    ax.annotate(_point_text(r, aug_kind), (r[metric], r["fid"]), textcoords="offset points",
                xytext=(5, 5), fontsize=7)
  if floor is not None:
    ax.axhline(floor, color="tab:green", ls="--", lw=1, label="FID train vs held-out")
  if ceiling is not None:
    ax.axvline(ceiling, color="tab:orange", ls="--", lw=1, label=f"{metric} of real pairs")
  ax.set_xlabel(metric_label if metric == "clip_score" and metric_label else
                "CLIP score" if metric == "clip_score" else
                "alignment score (offline model, not CLIP)")
  ax.set_ylabel("FID")
  ax.set_title("FID vs text alignment, one curve per sweep")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_report(result: dict[str, Any], workdir: str, table: str, plot: str) -> str:
  metric = result["metric"]
  lines = ["# Cascade evaluation", ""]
  lines.append("Stages: " + "; ".join(
      f"{s['resolution']}px from {s['source']} (step {s['step']}, {s['weights']})"
      for s in result["stages"]) + ".")
  lines.append("")
  if result.get("cascade"):
    c = result["cascade"]
    lines += ["## Samples through the cascade", ""]
    lines.append("Prompts: " + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(c["prompts"])))
    lines.append("")
    for grid, secs in zip(c["grids"], c["seconds"]):
      lines += [f"![{grid}]({grid})", "",
                f"{os.path.basename(grid)}: {secs:.1f} s (compilation included)", ""]
  sweep = result.get("aug_sweep")
  title = "Guidance and SR augmentation sweep" if sweep else "Guidance sweep"
  lines += [f"## {title} at {result['resolution']}px (stage {result['fid_stage']})", ""]
  if sweep:
    levels = ", ".join(f"{v:g}" for v in sweep["levels"])
    lines += [f"SR stages 1..{result['fid_stage']} sample their low-res input at each "
              f"augmentation level {sweep['kind']} in ({levels}); the table gives the "
              f"level at stage {result['fid_stage']} as t, log-SNR and sigma.", ""]
  protocol = result.get("protocol", {})
  floor = result["fid_floor"]
  lines += [f"FID against {result['reference_images']} held-out images; "
            + (f"{evaluators.metric_label(protocol)} (torchmetrics' definition)."
               if metric == "clip_score" else
               "alignment score and R-precision from the offline alignment model "
               "(imagen_jax/eval/alignment.py; not CLIP score)."), ""]
  if protocol:
    lines += [evaluators.protocol_markdown(protocol), ""]
  lines += [table, "",
            (f"Floor: FID(train, held-out) = {floor:.2f} ({result['train_images']} train "
             "images). " if floor is not None else "Floor: none (no train split). ")
            + "Ceiling on real held-out pairs: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in result["ceiling"].items()) + ".", "",
            f"![{os.path.basename(plot)}]({os.path.basename(plot)})", ""]
  for r in result["rows"]:
    head = (f"SR guidance {r['sr_guidance']:g}" if r.get("sweep") == "sr_guidance" else
            f"Guidance {r['guidance']:g}")
    if r.get("aug_level") is not None:
      head += f", aug {sweep['kind']}={r['aug_level']:g}"
    lines += [f"{head}:", "", f"![{r['grid']}]({r['grid']})", ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
