"""Copy trained toy-world models into the package (`alignment/toyworld/weights/`) with their manifest.

    python examples/toyworld/ship_weights.py --pipeline outputs/toyworld/pipeline --clip outputs/toyworld/clip
    python examples/toyworld/ship_weights.py --flow outputs/toyworld/flow      # the flow-matching twin alone

Each source is a training output dir (``final/`` + ``record.json``). MANIFEST.json lists every shipped
file's sha256 and each model's training record (command, seed, data size, wall time); `models.verify_weights`
and the tests check the files against it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment.toyworld import models  # noqa: E402

LIMIT_BYTES = 20 * 1024 * 1024


def ship(name: str, source: Path, notes: str | None = None) -> dict:
    final, record = source / "final", source / "record.json"
    if not final.is_dir() or not record.is_file():
        raise SystemExit(f"{source} has no final/ and record.json; train it first.")
    dest = models.WEIGHTS_DIR / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(final, dest)
    files = {str(p.relative_to(models.WEIGHTS_DIR)): models.sha256(p) for p in models.weight_files(dest)}
    entry = {"files": files, "training": json.loads(record.read_text())}
    if notes:
        entry["notes"] = notes
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", type=Path, help="output dir of examples/toyworld/train_pipeline.py")
    p.add_argument("--clip", type=Path, help="output dir of examples/toyworld/train_clip.py")
    p.add_argument("--flow", type=Path, help="output dir of examples/toyworld/train_flow_pipeline.py")
    p.add_argument("--pipeline-notes")
    p.add_argument("--clip-notes")
    p.add_argument("--flow-notes")
    args = p.parse_args(argv)
    manifest = models.read_manifest() if models.MANIFEST.is_file() else {"models": {}}
    for name, source, notes in (("pipeline", args.pipeline, args.pipeline_notes), ("clip", args.clip, args.clip_notes),
                                ("flow", args.flow, args.flow_notes)):
        if source:  # a model shipped again keeps its manifest notes unless new ones are given
            manifest["models"][name] = ship(name, source, notes or manifest["models"].get(name, {}).get("notes"))
    total = sum(p.stat().st_size for p in models.weight_files())
    if total > LIMIT_BYTES:
        raise SystemExit(f"shipped weights are {total / 2**20:.1f} MiB, over the 20 MiB limit.")
    manifest["total_bytes"] = total
    models.MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    models.verify_weights()
    print(f"shipped {len(models.weight_files())} files, {total / 2**20:.2f} MiB; manifest {models.MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
