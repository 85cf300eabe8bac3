"""The examples catalog: shipped examples (read-only, in the Bento) merged with examples ops promoted from
finished jobs (under the data folder). Both use the layout of DESIGN.md:
`catalog.json` = [{"slug", "name", "description", "prompt", "created_at"}] and `<slug>/{image.jpg,model.glb,model.usdz}`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, TypeAdapter, ValidationError

from pipeline.jobs import JobStore, Status
from pipeline.storage import (EXAMPLE_PREFIX, SERVED_ASSETS, Asset, AssetStore, FILE_NAMES, open_asset_store,
                              write_atomic)

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "examples"
SLUG_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class CatalogEntry(BaseModel):
    slug: str
    name: str
    description: str
    prompt: str
    created_at: str


_catalog_adapter = TypeAdapter(list[CatalogEntry])


@dataclass(frozen=True)
class Example:
    entry: CatalogEntry
    folder: Path

    @property
    def job_id(self) -> str:
        return EXAMPLE_PREFIX + self.entry.slug

    def path(self, asset: Asset) -> Path:
        # A shipped example's picture is the render of its model (converters/blender/examples.py): its preview too.
        # A promoted job brings its own preview when it had one.
        if asset is Asset.preview and not (self.folder / FILE_NAMES[asset]).is_file():
            asset = Asset.image
        return self.folder / FILE_NAMES[asset]


def read_catalog(root: Path) -> list[CatalogEntry]:
    path = root / "catalog.json"
    if not path.is_file():
        return []
    return _catalog_adapter.validate_json(path.read_bytes())


class ExampleCatalog:
    """Kept in memory; a look-up costs one stat per catalog to notice a promotion."""

    def __init__(self, *roots: Path) -> None:
        self.roots = roots
        self._by_id: dict[str, Example] = {}
        self._stamp: tuple[int, ...] = ()
        self._refresh()

    def _refresh(self) -> None:
        """Re-read the catalogs when one changed (a promotion), so promoted examples show without a restart."""
        stamp = tuple(_mtime(root / "catalog.json") for root in self.roots)
        if stamp != self._stamp:
            self._stamp = stamp
            self.reload()

    def reload(self) -> None:
        merged: dict[str, Example] = {}
        for root in self.roots:  # later roots (promoted) override earlier ones (shipped) on the same slug
            for entry in read_catalog(root):
                if SLUG_RE.fullmatch(entry.slug):
                    merged[EXAMPLE_PREFIX + entry.slug] = Example(entry, root / entry.slug)
        self._by_id = merged

    def all(self) -> list[Example]:
        self._refresh()
        return list(self._by_id.values())

    def get(self, example_id: str) -> Example | None:
        self._refresh()
        return self._by_id.get(example_id)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return -1


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63]
    return slug or "example"


def promote(job_id: str, name: str, description: str, *, store: JobStore, assets: AssetStore, root: Path,
            slug: str | None = None) -> CatalogEntry:
    """Copy a finished job's files into the promoted-examples folder and add it to that catalog."""
    job = store.get(job_id)
    if job is None:
        raise ValueError(f"Job not found: {job_id}")
    if job.status is not Status.complete:
        raise ValueError(f"Job {job_id} is {job.status.value}, not complete: only finished jobs can be examples")
    slug = slug or slugify(name)
    if not SLUG_RE.fullmatch(slug):
        raise ValueError(f"Invalid slug {slug!r}: use lowercase letters, digits and dashes")
    entries = [e for e in read_catalog(root) if e.slug != slug]
    folder = root / slug
    folder.mkdir(parents=True, exist_ok=True)
    for asset in (Asset.image, Asset.glb, Asset.usdz, Asset.preview):  # from the folder or the object store alike
        if asset is Asset.preview and not assets.has(job_id, asset):
            continue  # jobs made before previews existed
        write_atomic(folder / FILE_NAMES[asset], assets.read(job_id, asset))
    entry = CatalogEntry(slug=slug, name=name, description=description, prompt=job.prompt,
                         created_at=job.created_at)
    entries.append(entry)
    write_atomic(root / "catalog.json", _catalog_adapter.dump_json(entries, indent=2) + b"\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    from pipeline.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m pipeline.examples", description="Manage grok3d examples.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="make a finished job an example")
    p.add_argument("job_id")
    p.add_argument("--name", required=True)
    p.add_argument("--description", required=True)
    p.add_argument("--slug")
    args = parser.parse_args(argv)

    settings = get_settings()
    store = JobStore(settings.store_url)
    try:
        entry = promote(args.job_id, args.name, args.description, store=store,
                        assets=open_asset_store(settings), root=settings.promoted_examples_dir, slug=args.slug)
    except (ValueError, FileNotFoundError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"promoted {args.job_id} as {EXAMPLE_PREFIX}{entry.slug}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
