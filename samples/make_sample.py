"""Rebuild samples/ from the shared development data (../shared/data); kept so the sample's making is on record.

    python samples/make_sample.py --source ../shared/data --to samples

What it does (samples/README.md has the resulting file list and the licences):
- nih/images/: three NIH PNGs copied byte for byte (1024x1024, the size the NIH publishes);
- nih/images_128/: label-rich NIH images (one per patient) downsized to 128x128 8-bit grayscale (Lanczos),
  chosen so that every one of the 14 labels has positives; rare labels first, then by name;
- nih/images_64/: the first 60 names of the shared 64 px set, copied byte for byte (RGB/RGBA PNGs as their source
  stores them; follow-up series of 30 patients, for patient-wise splits);
- nih/labels.csv: those images' rows, verbatim from the NIH Data_Entry_2017_v2020.csv (header included);
- nih/manifest.csv: per file its size, mode, md5, processing and source;
- other-cxr/: the JPEG-compressed DICOM, its MONOCHROME1 copy and one grayscale JPEG, byte for byte, with their
  rows of the shared manifest;
- nih-metadata/: the official NIH metadata gzip-compressed (mtime-free, so rebuilding gives the same bytes).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image

FULL_RES = ("00000001_000.png", "00000002_000.png", "00005618_000.png")
N_128 = 220
N_64 = 60
SIZE = 128
OTHER = ("1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", "Fake_MONOHR1.dcm", "2c35005f.jpg")
METADATA = (("nih-metadata", "Data_Entry_2017_v2020.csv"), ("nih-metadata", "BBox_List_2017.csv"),
            ("nih", "train_val_list.txt"), ("nih", "test_list.txt"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data", help="the shared data folder (default: %(default)s)")
    parser.add_argument("--to", default="samples", help="the sample folder to (re)write (default: %(default)s)")
    return parser


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def choose_128(manifest: pd.DataFrame) -> list[str]:
    """N_128 label-rich images (not FULL_RES): those with the rarest labels first, ties by name."""
    pool = manifest[manifest["file"].str.startswith(("images/", "images_256/"))
                    & ~manifest["image_index"].isin(FULL_RES)]
    labels = pool["finding_labels"].str.split("|")
    counts = labels.explode().value_counts()
    rarity = labels.map(lambda names: min(counts[n] for n in names if n != "No Finding")
                        if names != ["No Finding"] else len(pool))
    order = pool.assign(rarity=rarity.to_numpy()).sort_values(["rarity", "image_index"])
    return order["image_index"].head(N_128).tolist()


def main(args: argparse.Namespace) -> int:
    source, out = Path(args.source), Path(args.to)
    manifest = pd.read_csv(source / "nih" / "manifest.csv", dtype=str, keep_default_na=False)
    by_name = manifest.set_index("image_index")
    nih = out / "nih"
    for sub in ("images", "images_128", "images_64"):
        shutil.rmtree(nih / sub, ignore_errors=True)
        (nih / sub).mkdir(parents=True)

    rows = []
    small = sorted(manifest[manifest["file"].str.startswith("images_64/")]["image_index"])[:N_64]
    plan = [(n, "images", None) for n in FULL_RES] + [(n, "images_128", SIZE) for n in choose_128(manifest)]
    plan += [(n, "images_64", None) for n in small]
    for name, folder, size in plan:
        src = by_name.loc[name]
        raw = (source / "nih" / src["file"]).read_bytes()
        if size is None:
            data, processing = raw, "copied unchanged"
        else:
            with Image.open(io.BytesIO(raw)) as im:
                resized = im.convert("L").resize((size, size), Image.LANCZOS)
            buffer = io.BytesIO()
            resized.save(buffer, "PNG", optimize=True)
            data = buffer.getvalue()
            processing = f"converted to 8-bit grayscale, resized {src['width']}x{src['height']} -> {size}x{size} " \
                         "(Pillow Lanczos), saved as optimized PNG"
        (nih / folder / name).write_bytes(data)
        with Image.open(io.BytesIO(data)) as im:
            width, height, mode = im.width, im.height, im.mode
        rows.append({"image_index": name, "file": f"{folder}/{name}", "width": width, "height": height,
                     "mode": mode, "bytes": len(data), "md5": md5(data), "processing": processing,
                     "shared_file": f"nih/{src['file']}", "shared_md5": src["md5"],
                     "source_repo": src["source_repo"], "source_path": src["source_path"],
                     "source_commit": src["source_commit"], "official_split": src["official_split"],
                     "patient_id": src["patient_id"], "finding_labels": src["finding_labels"]})
    pd.DataFrame(rows).to_csv(nih / "manifest.csv", index=False)

    # Data_Entry rows verbatim: the header line and each image's line, as text, in file order.
    wanted = {r["image_index"] for r in rows}
    lines = (source / "nih-metadata" / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if line.split(",", 1)[0] in wanted]
    if len(kept) - 1 != len(wanted):
        raise SystemExit(f"found {len(kept) - 1} Data_Entry rows for {len(wanted)} images")
    (nih / "labels.csv").write_text("\n".join(kept) + "\n")

    other = out / "other-cxr"
    other.mkdir(parents=True, exist_ok=True)
    for name in OTHER:
        shutil.copyfile(source / "other-cxr" / name, other / name)
    shared = (source / "other-cxr" / "manifest.csv").read_text().splitlines(keepends=True)
    (other / "manifest.csv").write_text("".join([shared[0]] + [line for line in shared[1:]
                                                                if line.split(",", 1)[0] in OTHER]))

    meta = out / "nih-metadata"
    meta.mkdir(parents=True, exist_ok=True)
    for folder, name in METADATA:
        data = (source / folder / name).read_bytes()
        # mtime=0 and no file name in the header: the same input always gives the same .gz bytes.
        with open(meta / f"{name}.gz", "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f,
                                                                 compresslevel=9, mtime=0) as gz:
            gz.write(data)
    print(f"{len(rows)} NIH images ({len({r['patient_id'] for r in rows})} patients), {len(OTHER)} other "
          f"X-rays, {len(METADATA)} metadata files written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
