"""The synthetic dataset: deterministic bytes, labels that match the drawn pixels, every knob
from the config."""

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.path import Path as MPath

from polydet.core.config import ConfigError, load_config
from polydet.data import synth
from polydet.data.formats import read_dota_labels
from polydet.geometry import polybox

PARAMS = Path(__file__).parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(
        load_config(PARAMS).synth,
        num_images=8,
        image_width=160,
        image_height=128,
        empty_fraction=0.25,
    )


def _digest(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def test_same_parameters_same_bytes(cfg, tmp_path: Path) -> None:
    a = synth.generate(cfg, tmp_path / "a")
    b = synth.generate(cfg, tmp_path / "b")
    da, db = _digest(a), _digest(b)
    assert len(da) == 16 and da == db
    other = synth.generate(dataclasses.replace(cfg, seed=cfg.seed + 1), tmp_path / "c")
    assert _digest(other) != da


def test_worker_processes_write_the_same_bytes(cfg, tmp_path: Path) -> None:
    """From PARALLEL_FROM images on, generate draws in worker processes: the same files, byte
    for byte, as drawing them all in this process."""
    big = dataclasses.replace(cfg, num_images=synth.PARALLEL_FROM)
    serial = _digest(synth.generate(big, tmp_path / "serial", workers=1))
    parallel = _digest(synth.generate(big, tmp_path / "parallel", workers=2))
    assert len(serial) == 2 * synth.PARALLEL_FROM and parallel == serial


def test_rerun_removes_stale_files_only(cfg, tmp_path: Path) -> None:
    out = synth.generate(cfg, tmp_path / "d")
    (out / "images" / "mine.png").write_bytes(b"user file")
    synth.generate(dataclasses.replace(cfg, num_images=3), out)
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "mine.png",
        "synth_00000.png",
        "synth_00001.png",
        "synth_00002.png",
    ]
    assert len(list((out / "labelTxt").iterdir())) == 3


def test_labels_are_valid_dota_inside_the_image(cfg, tmp_path: Path) -> None:
    out = synth.generate(dataclasses.replace(cfg, num_images=30), tmp_path / "e")
    counts = {c: 0 for c in cfg.classes}
    empty = 0
    for p in sorted((out / "labelTxt").glob("*.txt")):
        assert p.read_text().startswith("imagesource:polydet-synth\ngsd:null\n")
        objs = read_dota_labels(p)  # raises on any malformed or invalid quad
        empty += not objs
        for o in objs:
            counts[o.cls] += 1
            c = o.corners()
            assert (
                (c >= 0).all()
                and (c[:, 0] <= cfg.image_width).all()
                and (c[:, 1] <= cfg.image_height).all()
            )
            size = float(polybox.area(o.polybox().double())) ** 0.5 / min(
                cfg.image_width, cfg.image_height
            )
            assert 0.5 * cfg.scale_range[0] <= size <= 1.2 * cfg.scale_range[1]
        assert len(objs) <= cfg.max_objects
    assert empty >= 1 and all(n > 0 for n in counts.values())


def test_labels_cover_exactly_the_object_pixels(cfg) -> None:
    plain = dataclasses.replace(cfg, occlusion=0.0, truncation=0.0)
    h, w = plain.image_height, plain.image_width
    yy, xx = np.mgrid[0:h, 0:w]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    drawn = 0
    for i in range(6):
        r = synth.render(plain, i)
        assert r.image.shape == (h, w, 3) and r.image.dtype == np.uint8
        inside = np.zeros(h * w, bool)
        for o in r.objects:
            inside |= MPath(o.label).contains_points(centres)
        assert (inside.reshape(h, w) == r.object_mask).all()
        drawn += len(r.objects)
    assert drawn >= 6


def test_objects_look_different_from_the_background(cfg) -> None:
    # The classes are told apart by colour and pattern: objects are brighter or more
    # saturated than the muted background on average.
    r = synth.render(dataclasses.replace(cfg, occlusion=0.0), 1)
    img = r.image.astype(float)
    sat = img.max(-1) - img.min(-1)
    assert sat[r.object_mask].mean() > sat[~r.object_mask].mean() + 20 or (
        img[r.object_mask].mean() > img[~r.object_mask].mean() + 20
    )


def test_truncated_objects_are_labelled_by_their_visible_part(cfg) -> None:
    edgy = dataclasses.replace(
        cfg, truncation=1.0, min_objects=3, max_objects=3, empty_fraction=0.0
    )
    r = synth.render(edgy, 2)
    assert any(o.truncated for o in r.objects)
    for o in r.objects:
        full = float(polybox.area(polybox.from_corners(torch.from_numpy(o.corners))))
        lab = float(polybox.area(polybox.from_corners(torch.from_numpy(o.label))))
        assert 0.5 <= lab / full <= 0.93 if o.truncated else lab == pytest.approx(full)


def test_bad_synth_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"synth\.scale_range"):
        load_config(PARAMS, ["synth.scale_range=[0.5, 0.1]"])
    # synth draws data.classes: a class it has no shape for is named with that key.
    with pytest.raises(ConfigError, match=r"data\.classes: \['boat'\]"):
        synth.generate(
            load_config(PARAMS, ["data.classes=[card, boat]"]).synth, Path("/nonexistent")
        )
