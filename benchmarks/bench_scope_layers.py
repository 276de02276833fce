"""Tried for the demo model's in-scope check, without retraining: the features part read from other ResNet stages
(alone, or combined as in Lee et al., NeurIPS 2018, "A simple unified framework for detecting out-of-distribution
samples and adversarial attacks", with equal weights), and the layout/histogram parts cross-fitted on the training
and calibration images together. Each variant is refitted on the checkpoint's own splits as train.py fits the trust
data (Gaussians on the training split, each part's scale and the limit at the 99th percentile of the calibration
split), then scores the sets of bench_demo_scope.py and held-out NIH images.

    python benchmarks/bench_scope_layers.py [--checkpoints .cache/demo_model.pth OTHER.pth] [--data-dir samples/nih]

Features part: T (the transition's pooled output, today's mahalanobis+layout), L1-L4 (the pooled output of ResNet
layer1-layer4 in its place), ENS-MEAN / ENS-MAX (the mean / max over L1-L4 and T of each stage's distance over its
calibration percentile, then over that combination's own calibration percentile). Input parts: AS-IS (Gaussians on
the training split, scales on the calibration split) or CF (both blocks' Gaussians on training + calibration images,
scales and the calibration images' scores from 5 patient-wise folds' out-of-fold distances; these parts read only
the image, which the network's training does not touch). The decision rule was written before any film was scored;
it is repeated in the report. Figures in benchmarks/results/scope_layers.md.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import bench_demo_scope as sets_of
import numpy as np
import torch
from common import ROOT, add_out_argument, write_report
from torch.utils.data import DataLoader

from chestxray.checkpoint import checkpoint_from_obj, safe_torch_load
from chestxray.data import XrayDataset, collate_batch, load_index
from chestxray.fitting import training_splits
from chestxray.imaging import InvalidImage, read_xray
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import scope as S

PERCENTILE = 99.0
STAGES = ("L1", "L2", "L3", "L4", "T")
FEATURES = ("T", "L4", "L3", "L2", "L1", "ENS-MEAN", "ENS-MAX")
INPUTS = ("AS-IS", "CF")
FOLDS = 5
NOT_XRAY = ("photos", "CT/MR", "generated")
SHOWN_FILMS = ("2168a917.jpg", "2c35005f.jpg", "b343e657.jpg")
NEGATIVE_FILM = "Fake_MONOHR1.dcm"  # MONOCHROME1 in its header, MONOCHROME2 pixels: a negative film, rightly refused
RULE = ("Rule, fixed before any film was scored: a variant is eligible when, on every model, photos, CT/MR and "
        "generated images are 0 accepted (0 positive calls) and at least 14 of the 15 distinct external films "
        f"(other-cxr without {NEGATIVE_FILM}) are accepted; among eligible ones, the largest worst-case margin (lowest "
        "non-X-ray score over the limit, the minimum over the models), ties within 0.02 to the simpler (AS-IS before "
        "CF; T, L4, L3, L2, L1, ENS-MEAN, ENS-MAX). None eligible: no product change.")


class StageFeatures:
    """A checkpoint's pooled features after each ResNet stage and after the transition, and the input's
    image_statistics, of uint8 inputs (N, 1, S, S) as the Predictor prepares them."""

    def __init__(self, checkpoint: str):
        obj = safe_torch_load(checkpoint)
        model, self.meta, _ = checkpoint_from_obj(obj, checkpoint)
        scope = (obj.get("trust") or {}).get("scope") or {}
        self.stored_limit = float(scope["limit"]) if scope.get("method") == "mahalanobis+layout" else None
        if not self.meta.arch.startswith("resnet"):
            raise SystemExit(f"{checkpoint}: the stages are read from a ResNet trunk; this one is {self.meta.arch}")
        self.model = model.eval()
        self.transform, self.normalize = build_transform(self.meta, train=False), build_normalize(self.meta)
        self.stage_at = {i: f"L{i - 3}" for i in range(4, 8)}  # _trunk_layers: conv1, bn1, relu, maxpool, layer1-4

    @torch.inference_mode()
    def __call__(self, x_u8: torch.Tensor, batch: int = 16) -> dict[str, np.ndarray]:
        out = {k: [] for k in (*STAGES, "image")}
        for start in range(0, len(x_u8), batch):
            x = h = self.normalize(x_u8[start:start + batch])
            for i, module in enumerate(self.model.trunk):
                h = module(h)
                if i in self.stage_at:
                    out[self.stage_at[i]].append(S.pooled_features(h).numpy())
            out["T"].append(S.pooled_features(self.model.transition(h)).numpy())
            out["image"].append(S.image_statistics(x[:, :1].numpy(), self.meta.mean[0], self.meta.std[0]))
        return {k: np.concatenate(v) for k, v in out.items()}

    def split(self, frame) -> tuple[torch.Tensor, np.ndarray]:
        """A split's inputs and each readable image's patient."""
        loader = DataLoader(XrayDataset(frame, self.meta.labels, self.transform, None, skip_unreadable=True),
                            batch_size=32, collate_fn=collate_batch)
        batches = [(b[0], b[2]) for b in loader if b[0].numel()]
        index = torch.cat([i for _, i in batches]).numpy()
        return torch.cat([x for x, _ in batches]), frame["patient"].to_numpy()[index]

    def images(self, images: list[tuple[str, bytes]]) -> tuple[torch.Tensor, list[str]]:
        """Readable images' inputs and names (an unreadable one is refused before the model, as
        bench_demo_scope counts it)."""
        inputs, names = [], []
        for name, data in images:
            try:
                inputs.append(torch.as_tensor(self.transform(read_xray(data))))
                names.append(name)
            except InvalidImage:
                pass
        return torch.stack(inputs), names


def _pct(values: np.ndarray) -> float:
    return float(np.percentile(values, PERCENTILE))


def feature_parts(feats: dict) -> dict[str, dict[str, np.ndarray]]:
    """variant -> group -> features part (over its calibration percentile)."""
    per_stage = {}
    for stage in STAGES:
        mean, precision = S._gaussian(feats["train"][stage].astype(np.float64), standardize=True)
        dist = {g: S._distance(f[stage], mean, precision) for g, f in feats.items()}
        scale = _pct(dist["calibration"])
        per_stage[stage] = {g: v / scale for g, v in dist.items()}
    parts = dict(per_stage)
    for name, combine in (("ENS-MEAN", np.mean), ("ENS-MAX", np.max)):
        joint = {g: combine([per_stage[s][g] for s in STAGES], axis=0) for g in feats}
        scale = _pct(joint["calibration"])
        parts[name] = {g: v / scale for g, v in joint.items()}
    return parts


def input_parts(feats: dict, patients: np.ndarray, cross_fit: bool) -> dict[str, list[np.ndarray]]:
    """group -> [layout, histogram] parts, each over the input part's scale (as ScopeStats.score divides them)."""
    part = {g: S._input_part(f["image"], "mahalanobis+layout") for g, f in feats.items()}
    if not cross_fit:
        mean, precision = S._layout_blocks(part["train"], part["calibration"], PERCENTILE)
        blocks = {g: [S._distance(p[:, a:b], mean[a:b], precision[a:b, a:b]) for a, b in S.LAYOUT_BLOCKS]
                  for g, p in part.items()}
        scale = _pct(np.max(blocks["calibration"], axis=0))
        return {g: [v / scale for v in b] for g, b in blocks.items()}
    pool = np.concatenate([part["train"], part["calibration"]])
    unique = np.unique(patients)
    fold_of = dict(zip(unique, np.random.default_rng(0).permutation(len(unique)) % FOLDS))
    fold = np.array([fold_of[p] for p in patients])
    oof = np.zeros((len(pool), len(S.LAYOUT_BLOCKS)))
    for k in range(FOLDS):
        for j, (a, b) in enumerate(S.LAYOUT_BLOCKS):
            mean, precision = S._gaussian(pool[fold != k, a:b].astype(np.float64), standardize=True)
            oof[fold == k, j] = S._distance(pool[fold == k, a:b], mean, precision)
    block_scale = np.array([_pct(oof[:, j]) for j in range(len(S.LAYOUT_BLOCKS))])
    full = [S._gaussian(pool[:, a:b].astype(np.float64), standardize=True) for a, b in S.LAYOUT_BLOCKS]
    oof = oof / block_scale
    scale = _pct(oof.max(axis=1))
    out = {g: [S._distance(p[:, a:b], m, pr) / s / scale
               for (a, b), (m, pr), s in zip(S.LAYOUT_BLOCKS, full, block_scale)] for g, p in part.items()}
    n_train = len(part["train"])
    out["train"], out["calibration"] = ([oof[rows, j] / scale for j in range(len(S.LAYOUT_BLOCKS))]
                                        for rows in (slice(0, n_train), slice(n_train, None)))
    return out


def measure(checkpoint: str, data_dir: Path, sets: dict, nih) -> list[dict]:
    """One row per variant: limit, accepted per group, refused films, the shown films' parts, nearest non-X-ray."""
    model = StageFeatures(checkpoint)
    splits = training_splits(model.meta, data_dir)
    inputs, patients = {}, []
    for group, frame in (("train", splits["train"]), ("calibration", splits["calibration"]), ("held-out NIH", nih)):
        inputs[group], who = model.split(frame)
        patients += list(who) if group != "held-out NIH" else []
    names = {}
    for group, images in sets.items():
        inputs[group], names[group] = model.images(images)
    feats = {g: model(x) for g, x in inputs.items()}
    features = feature_parts(feats)
    print(f"{checkpoint}: stored mahalanobis+layout limit {model.stored_limit} (T+AS-IS refits it below)")
    rows = []
    for input_kind in INPUTS:
        inp = input_parts(feats, np.asarray(patients), input_kind == "CF")
        for variant in FEATURES:
            parts = {g: np.stack([features[variant][g], *inp[g]]) for g in feats}
            score = {g: p.max(axis=0) for g, p in parts.items()}
            limit = _pct(score["calibration"])
            films = [i for i, n in enumerate(names["other-cxr"]) if n != NEGATIVE_FILM]
            non_xray = min((score[g][i], n) for g in NOT_XRAY for i, n in enumerate(names[g]))
            rows.append({
                "variant": f"{variant}+{input_kind}", "limit": limit,
                "accepted": {g: (int((s <= limit).sum()), len(s)) for g, s in score.items()},
                "films": (int((score["other-cxr"][films] <= limit).sum()), len(films)),
                "refused": [names["other-cxr"][i] for i in films if score["other-cxr"][i] > limit],
                "shown": {n: parts["other-cxr"][:, names["other-cxr"].index(n)] for n in SHOWN_FILMS
                          if n in names["other-cxr"]},
                "nearest": non_xray,
                # how far out the refused films are among same-source images: held-out NIH at or above on features
                "nih_above": {n: float((features[variant]["held-out NIH"]
                                        >= features[variant]["other-cxr"][names["other-cxr"].index(n)]).mean())
                              for n in SHOWN_FILMS[:2] if n in names["other-cxr"]}})
    return rows


def report(results: dict[str, list[dict]]) -> list[str]:
    groups = ("photos", "CT/MR", "generated", "other-cxr", "samples/other-cxr", "held-out NIH", "calibration")
    lines = [RULE, "", "| model | variant | limit | " + " | ".join(groups) + " | distinct external films | refused |",
             "|---|---|---|" + "---|" * (len(groups) + 2)]
    for model, rows in results.items():
        for r in rows:
            a = r["accepted"]
            lines.append(f"| {model} | {r['variant']} | {r['limit']:.3f} | "
                         + " | ".join(f"{a[g][0]}/{a[g][1]}" for g in groups)
                         + f" | {r['films'][0]}/{r['films'][1]} | {', '.join(r['refused'])} |")
    lines += ["", "Parts: features, layout, histogram, each over its calibration scale (the score is their max; in "
              "scope when the score <= limit). Nearest non-X-ray: the lowest score among photos, CT/MR and generated. "
              "Last column: the share of held-out NIH images whose features part is at least the film's.",
              "", "| model | variant | limit | " + " | ".join(SHOWN_FILMS) + " | nearest non-X-ray | held-out NIH "
              f"at or above {' / '.join(SHOWN_FILMS[:2])} on features |",
              "|---|---|---|" + "---|" * (len(SHOWN_FILMS) + 2)]
    for model, rows in results.items():
        for r in rows:
            shown = " | ".join("/".join(f"{v:.2f}" for v in r["shown"][n]) for n in SHOWN_FILMS)
            lines.append(f"| {model} | {r['variant']} | {r['limit']:.3f} | {shown} | {r['nearest'][1]} "
                         f"{r['nearest'][0]:.2f} | {' / '.join(f'{100 * v:.1f} %' for v in r['nih_above'].values())} |")
    eligible = [v["variant"] for v in next(iter(results.values()))
                if all(r["films"][0] >= r["films"][1] - 1 and all(r["accepted"][g][0] == 0 for g in NOT_XRAY)
                       for rows in results.values() for r in rows if r["variant"] == v["variant"])]
    lines += ["", f"Eligible under the rule: {', '.join(eligible) if eligible else 'none'}.", "",
              "Positive calls are not counted here: these demo models validate no label, so none can be called. "
              "Another seed of the demo recipe: `python benchmarks/bench_intensity.py --seeds 1 --variants none "
              "--work DIR` trains it as DIR/demo-none-seed1.pth (Model_Training/demo.py's arguments and --seed 1)."]
    return lines


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=[str(ROOT / ".cache" / "demo_model.pth")],
                        help="demo-recipe checkpoints, each refitted on its own splits (default: %(default)s)")
    parser.add_argument("--data-dir", default=str(ROOT / "samples" / "nih"),
                        help="the folder they were trained on (default: %(default)s)")
    parser.add_argument("--other-cxr", default=str(ROOT.parent / "shared" / "data" / "other-cxr"),
                        help="external chest X-rays (default: %(default)s)")
    parser.add_argument("--nih", default=str(ROOT.parent / "shared" / "data" / "nih"),
                        help="NIH images; those of patients not in --data-dir are scored (default: %(default)s)")
    add_out_argument(parser, "scope_layers.md")
    return parser


def main(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    sets = {"photos": sets_of.photos(), "CT/MR": sets_of.dicom_files(), "generated": sets_of.generated(),
            "other-cxr": sets_of.folder(Path(args.other_cxr)),
            "samples/other-cxr": sets_of.folder(ROOT / "samples" / "other-cxr")}
    seen = set(load_index(args.data_dir, allow_missing=True)["patient"])
    nih = load_index(args.nih, allow_missing=True)
    nih = nih[~nih["patient"].isin(seen)].reset_index(drop=True)
    results = {Path(c).name: measure(c, Path(args.data_dir), sets, nih) for c in args.checkpoints}
    command = "python benchmarks/bench_scope_layers.py --checkpoints " + " ".join(args.checkpoints)
    write_report([f"`{command}`", "", *report(results)], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
