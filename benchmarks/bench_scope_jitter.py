"""Tried for the demo model's in-scope check: widening its fit with intensity-jittered copies of the training (and
calibration) images, so that washed-out or differently windowed chest X-rays from other sites are accepted. Prints,
per variant, how many images of each set are accepted (calibration split = held-out NIH images).

    python benchmarks/bench_scope_jitter.py   # reads .cache/demo_model.pth and samples/nih; writes results/scope_jitter.md

Jitter: gamma 0.6/0.8/1.25/1.6 and contrast around the mean x0.5/x0.75, on the model's uint8 input. "jitcal": the
calibration images (which choose the part scales and the limit) are jittered too. Percentile: the limit's.
"""
import sys, warnings
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT / "Model_Training"))
warnings.simplefilter("ignore")
import numpy as np, torch
from pathlib import Path
from torch.utils.data import DataLoader
import bench_demo_scope as b
from chestxray.checkpoint import safe_torch_load, checkpoint_from_obj
from chestxray.predictor import Predictor
from chestxray.imaging import read_xray, InvalidImage
from chestxray.scope import image_statistics, pooled_features, fit_scope
from chestxray.data import XrayDataset, collate_batch
from fit_trust import training_splits, build_transform, build_normalize
obj = safe_torch_load(str(ROOT / ".cache" / "demo_model.pth"))
model, meta, _ = checkpoint_from_obj(obj, "demo")
model.eval()
splits = training_splits(meta, str(ROOT / "samples" / "nih"))
tf, norm = build_transform(meta, train=False), build_normalize(meta)
def feats(xu8):
    x = norm(xu8)
    with torch.no_grad():
        pooled = pooled_features(model.features(x))
    return pooled.numpy(), image_statistics(x, meta.mean[0], meta.std[0]).numpy()
def jitter(xu8, kind, v):
    x = xu8.float() / 255
    if kind == "gamma": x = x ** v
    elif kind == "contrast":
        m = x.mean(dim=(2, 3), keepdim=True); x = m + v * (x - m)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
def loader_inputs(df):
    dl = DataLoader(XrayDataset(df, meta.labels, tf, None, skip_unreadable=True), batch_size=32, collate_fn=collate_batch)
    return torch.cat([batch[0] for batch in dl])
tr, cal = loader_inputs(splits["train"]), loader_inputs(splits["calibration"])
print("train", tr.shape, "cal", cal.shape)
sets = {"photos": b.photos(), "ctmr": b.dicom_files(), "gen": b.generated(), "ext": b.folder(ROOT.parent / "shared" / "data" / "other-cxr"), "samp": b.folder(ROOT / "samples" / "other-cxr")}
ins = {}
for k, imgs in sets.items():
    xs = []
    for fn, data in imgs:
        try: xs.append(tf(read_xray(data)))
        except InvalidImage: pass
    ins[k] = torch.stack(xs)
F = {k: feats(v) for k, v in ins.items()}
base_tr, base_cal = feats(tr), feats(cal)
JIT = {"none": [], "gamma": [("gamma", g) for g in (0.6, 0.8, 1.25, 1.6)], "contrast": [("contrast", c) for c in (0.5, 0.75)],
       "both": [("gamma", g) for g in (0.6, 0.8, 1.25, 1.6)] + [("contrast", c) for c in (0.5, 0.75)]}
lines = ["| jitter | jitcal | percentile | calibration | photos | CT/MR | generated | other-cxr | samples/other-cxr |", "|---|---|---|---|---|---|---|---|---|"]
for name, jits in JIT.items():
  for jit_cal in (False, True):
    if name == "none" and jit_cal: continue
    tp, ti = [base_tr[0]], [base_tr[1]]
    cp, ci = [base_cal[0]], [base_cal[1]]
    for kind, v in jits:
        p, i = feats(jitter(tr, kind, v)); tp.append(p); ti.append(i)
        if jit_cal:
            p, i = feats(jitter(cal, kind, v)); cp.append(p); ci.append(i)
    tp, ti, cp, ci = map(np.concatenate, (tp, ti, cp, ci))
    for pct in (99, 100):
        s = fit_scope(tp, "mahalanobis+image", ti, cp, ci, pct)
        s = s.with_limit(s.score(cp, ci), pct)
        acc = {k: int(s.in_scope(s.score(*F[k])).sum()) for k in F}
        calacc = int(s.in_scope(s.score(*base_cal)).sum())
        lines.append(f"| {name} | {'yes' if jit_cal else 'no'} | {pct} | {calacc}/{len(cal)} | " + " | ".join(f"{acc[k]}/{len(ins[k])}" for k in F) + " |")
text = "\n".join(lines) + "\n"
print(text)
(ROOT / "benchmarks" / "results" / "scope_jitter.md").write_text(text)
