"""GTSRB, the German Traffic Sign Recognition Benchmark (43 classes).

Reads, from zip archives or their extracted folders:

* the official distribution: ``GTSRB_Final_Training_Images.zip``
  (``GTSRB/Final_Training/Images/000CC/TTTTT_IIIII.ppm`` with a per-class
  ``GT-000CC.csv``: ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``),
  ``GTSRB_Final_Test_Images.zip`` (``GTSRB/Final_Test/Images/NNNNN.ppm``) and
  ``GTSRB_Final_Test_GT.zip`` (``GT-final_test.csv``, the test labels);
* the Kaggle re-packaging: ``Train.csv``/``Test.csv``
  (``Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path``) and PNG files
  ``Train/CC/000CC_TTTTT_IIIII.png``, ``Test/NNNNN.png``.

``path`` may be any of these archives, a folder holding them, or an extracted
folder.  Images are uint8 NCHW, resized (optionally after cropping to the
annotated region of interest, whose x2/y2 are taken as inclusive pixel
coordinates) to ``image_size`` squares.  The validation split takes whole tracks
(about 30 pictures of one physical sign), stratified by class and seeded.
"""
import csv
import io
import re

import numpy as np

from ...errors import DataError
from ...hookspecs import hookimpl
from .. import cache as array_cache
from .. import fetch
from ..assemble import image_dataset, seed_streams
from ..images import load_images
from ..sources import FolderSource, ZipSource
from ..splitting import limit_per_class

NAME = "gtsrb"
NUM_CLASSES = 43
READER_VERSION = 1
ARCHIVES = ("GTSRB_Final_Training_Images.zip", "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip")

CLASS_NAMES = [
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 t",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 t prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing",
    "Beware of ice/snow", "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead",
    "Turn left ahead", "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 t",
]

#: Classes whose horizontal mirror image is a GTSRB sign: symmetric signs map to
#: themselves, mirrored pairs to each other (e.g. "turn right ahead" <-> "turn left
#: ahead").  ``[data.augment] hflip = true, flip_class_map = "dataset"`` takes it
#: (the loaded dataset's ``mirror_classes``); the other classes are never flipped.
HFLIP_CLASS_MAP = {
    11: 11, 12: 12, 13: 13, 15: 15, 17: 17, 18: 18, 22: 22, 26: 26, 30: 30, 35: 35,
    19: 20, 20: 19, 33: 34, 34: 33, 36: 37, 37: 36, 38: 39, 39: 38,
}

_OFFICIAL_TRAIN_CSV = re.compile(r"(?:^|/)Final_Training/Images/(\d{5})/GT-(\d{5})\.csv$")
_KAGGLE_TRACK = re.compile(r"^(\d{5})_(\d{5})_(\d{5})\.\w+$")
_OFFICIAL_TRACK = re.compile(r"^(\d{5})_(\d{5})\.\w+$")


class _Images:
    """The images of one split as parallel lists (filled while reading the CSVs)."""

    def __init__(self):
        self.items, self.boxes, self.labels, self.groups, self.rows = [], [], [], [], []

    def __len__(self):
        return len(self.items)

    def take(self, index):
        out = _Images()
        for name in ("items", "boxes", "labels", "groups", "rows"):
            values = getattr(self, name)
            setattr(out, name, [values[i] for i in index])
        return out


def _sources(root):
    """Every archive/folder under ``root`` worth searching, archives first."""
    if root.is_file():
        return [ZipSource(root)]
    sources = [ZipSource(p) for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() == ".zip"]
    folder = FolderSource(root)
    if any(not n.lower().endswith(".zip") for n in folder.names()):
        sources.append(folder)
    return sources


def _read_csv(source, member):
    """(header, rows) of an annotation CSV (comma or semicolon separated)."""
    text = source.read(member).decode("utf-8-sig", errors="replace")
    first = text.split("\n", 1)[0]
    rows = list(csv.reader(io.StringIO(text), delimiter=";" if ";" in first else ","))
    if not rows:
        raise DataError(f"{source.member_label(member)}: empty annotation file; expected a header line")
    return [h.strip() for h in rows[0]], rows[1:]


def _parse_rows(source, member, path_column, image_source, base, out, group_of):
    """Append the images named in one annotation CSV (in ``source``) to ``out``.

    The images are ``base + <path column>`` in ``image_source`` (the official test
    labels come in another archive than the test images).
    """
    label = source.member_label(member)
    header, rows = _read_csv(source, member)
    needed = [path_column, "ClassId"]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{label}: missing column(s) {', '.join(missing)}; expected {';'.join(header and needed)} in the header")
    col = {name: i for i, name in enumerate(header)}
    has_roi = all(k in col for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
    for number, row in enumerate(rows, start=2):  # line numbers as an editor shows them
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"{label} row {number}"
        try:
            class_id = int(row[col["ClassId"]])
            file = row[col[path_column]].strip()
            box = None
            if has_roi:
                x1, y1, x2, y2 = (int(row[col[k]]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
                box = (x1, y1, x2 + 1, y2 + 1)  # inclusive corner pixels -> exclusive box
        except (ValueError, IndexError):
            raise DataError(f"{where}: malformed row {';'.join(row)!r}; expected {len(header)} columns {';'.join(header)}") from None
        if not 0 <= class_id < NUM_CLASSES:
            raise DataError(f"{where}: ClassId {class_id} out of range; expected 0..{NUM_CLASSES - 1}")
        name = base + file
        if not image_source.exists(name):
            raise DataError(f"{where}: image '{file}' not found (looked for {image_source.member_label(name)})")
        out.items.append((image_source, name))
        out.boxes.append(box)
        out.labels.append(class_id)
        out.groups.append(group_of(file, class_id))
        out.rows.append(where)


def _track_group(pattern, track_index):
    def group_of(file, class_id):
        m = pattern.match(file.rsplit("/", 1)[-1])
        # (class, track) identifies a physical sign; -1 marks "unknown track".
        return class_id * 100_000 + int(m.group(track_index)) if m else -1

    return group_of


def _no_group(file, class_id):
    return -1


def _find_layout(sources):
    """(train images, test images, layout description) found in ``sources``."""
    train, test, layout = _Images(), _Images(), []
    test_images = {}  # official test image file name -> (source, member)
    test_gt = None
    for source in sources:
        names = source.names()
        members = set(names)
        kaggle = sorted((n for n in names if n.rsplit("/", 1)[-1] == "Train.csv"), key=len)
        official = sorted(n for n in names if _OFFICIAL_TRAIN_CSV.search(n))
        if not len(train) and kaggle:
            base = kaggle[0][: -len("Train.csv")]
            _parse_rows(source, kaggle[0], "Path", source, base, train, _track_group(_KAGGLE_TRACK, 2))
            if base + "Test.csv" in members:
                _parse_rows(source, base + "Test.csv", "Path", source, base, test, _no_group)
            layout.append(f"Kaggle layout in {source.label}")
        elif not len(train) and official:
            for member in official:
                folder = member.rsplit("/", 1)[0] + "/"
                _parse_rows(source, member, "Filename", source, folder, train, _track_group(_OFFICIAL_TRACK, 1))
            layout.append(f"official training images in {source.label}")
        for n in names:
            if "Final_Test/Images/" in n and not n.endswith(".csv"):
                test_images.setdefault(n.rsplit("/", 1)[-1], (source, n))
            elif n.rsplit("/", 1)[-1] == "GT-final_test.csv" and test_gt is None:
                test_gt = (source, n)
    if not len(test) and test_gt is not None and test_images:
        _parse_official_test(test_gt, test_images, test)
        layout.append(f"official test labels in {test_gt[0].label}")
    return train, test, layout


def _parse_official_test(test_gt, test_images, out):
    source, member = test_gt
    # The labels (GT zip) and the images (test zip) usually live in different archives.
    places = {(id(img_source), name.rsplit("/", 1)[0]) for img_source, name in test_images.values()}
    if len(places) != 1:
        raise DataError(f"{source.member_label(member)}: official test images found in several places; keep one copy")
    img_source, first = next(iter(test_images.values()))
    folder = first.rsplit("/", 1)[0] + "/"
    _parse_rows(source, member, "Filename", img_source, folder, out, _no_group)


def _decode(images, image_size, roi_crop, grayscale):
    return load_images(images.items, size=image_size, boxes=images.boxes if roi_crop else None,
                       grayscale=grayscale, labels=images.rows)


def load_gtsrb(
    path: str | None = None,
    seed: int = 0,
    image_size: int = 48,
    roi_crop: bool = True,
    grayscale: bool = False,
    val_fraction: float = 0.1,
    max_per_class: int | None = None,
    download: bool = True,
    cache: bool = True,
):
    """Load GTSRB as uint8 NCHW images of ``image_size`` squares.

    Args:
        path: an archive or folder (see the module docstring); default
            ``$RABBIT_DATA/gtsrb/`` or the per-user data folder.
        seed: seeds the validation split (and the ``max_per_class`` selection).
        image_size: edge of the square the images are resized to (Ciresan et al.: 48).
        roi_crop: crop to the annotated sign before resizing.
        grayscale: decode to one channel instead of RGB.
        val_fraction: fraction of training *tracks* held out for validation.
        max_per_class: keep at most this many images per class in each split
            (whole tracks first), for quick runs.
        download: fetch the official archives when nothing is found locally
            (never when ``$RABBIT_OFFLINE`` is set).
        cache: keep the decoded arrays on disk (the second load takes well under a second).
    """
    if image_size < 1:
        raise DataError(f"gtsrb: image_size must be a positive number of pixels, got {image_size}")
    root = fetch.ensure_available(NAME, path, download)
    sources = _sources(root)
    split_rng, limit_rng = seed_streams(seed, 2)
    parts = {
        "reader": NAME, "version": READER_VERSION, "sources": [s.fingerprint() for s in sources],
        "image_size": image_size, "roi_crop": roi_crop, "grayscale": grayscale,
        "max_per_class": max_per_class, "seed": seed if max_per_class else None,
    }

    def build():
        train, test, layout = _find_layout(sources)
        if not len(train):
            raise DataError(
                f"{root}: no GTSRB training data found; expected {ARCHIVES[0]} "
                "(Final_Training/Images/000NN/GT-000NN.csv + .ppm files) or the Kaggle layout (Train.csv + Train/<class>/*.png)"
            )
        if max_per_class:
            train = train.take(limit_per_class(train.labels, max_per_class, limit_rng, train.groups))
            if len(test):
                test = test.take(limit_per_class(test.labels, max_per_class, limit_rng))
        arrays = {
            "train_x": _decode(train, image_size, roi_crop, grayscale),
            "train_y": np.asarray(train.labels, np.int64),
            "train_groups": np.asarray(train.groups, np.int64),
            "layout": np.array(layout),
        }
        if len(test):
            arrays["test_x"] = _decode(test, image_size, roi_crop, grayscale)
            arrays["test_y"] = np.asarray(test.labels, np.int64)
        return arrays

    arrays = array_cache.load_or_build(NAME, parts, build, enabled=cache)
    groups = arrays["train_groups"]
    if (groups < 0).any():
        # Unknown tracks: every image is its own group (validation split by image).
        groups = np.where(groups < 0, -1 - np.arange(len(groups)), groups)
        arrays = {**arrays, "train_groups": groups}
    info = {"source": str(root), "layout": "; ".join(str(s) for s in arrays["layout"]),
            "options": f"image_size={image_size} roi_crop={roi_crop} grayscale={grayscale} "
                       f"val_fraction={val_fraction} seed={seed}"}
    if "test_x" not in arrays:
        info["test_missing"] = (f"looked in {root} for Test.csv beside Train.csv (Kaggle layout) and for "
                                f"GT-final_test.csv with the Final_Test images (official layout)")
    dataset = image_dataset(NAME, arrays, CLASS_NAMES, val_fraction, split_rng, info, by_group=True)
    dataset.mirror_classes = {"hflip": dict(HFLIP_CLASS_MAP)}
    return dataset


@hookimpl
def rabbit_datasets():
    return {NAME: load_gtsrb}
