"""`data.dvc` stays valid on a fresh clone: regenerating the synthetic default from
params.yaml gives exactly the tree whose hash data.dvc records (DVC's .dir md5, recomputed
here independently: md5 of the sorted JSON list of per-file md5s)."""

import hashlib
import json
import os
from pathlib import Path

import yaml

from polydet.core.config import load_config
from polydet.data.synth import generate

ROOT = Path(__file__).resolve().parents[1]


def dvc_dir_md5(root: Path) -> tuple[str, int, int]:
    entries = []
    size = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            data = path.read_bytes()
            size += len(data)
            rel = path.relative_to(root).as_posix()
            entries.append({"md5": hashlib.md5(data).hexdigest(), "relpath": rel})
    entries.sort(key=lambda e: e["relpath"])
    digest = hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    return digest + ".dir", len(entries), size


def test_regenerated_synthetic_tree_matches_data_dvc(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "params.yaml")
    recorded = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert recorded["path"] == "data"
    # params.yaml's synth.out lies under data/; regenerate the same relative layout elsewhere.
    rel = Path(cfg.synth.out).relative_to("data")
    generate(cfg.synth, tmp_path / "data" / rel)
    md5, nfiles, size = dvc_dir_md5(tmp_path / "data")
    assert (nfiles, size) == (recorded["nfiles"], recorded["size"])
    assert md5 == recorded["md5"]
