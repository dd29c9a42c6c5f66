"""`quantzoo publish` and `quantzoo download`: optimized artifacts through any static file server.

Layout (what publish writes and download reads), under a base URL or folder:
    <model>/<recipe>/manifest.json
    <model>/<recipe>/<model>-<recipe>-<sha256[:8]>.onnx | .encodings.json | .safetensors
The sha256 that download verifies comes from the model card's ``artifacts`` when the card lists
the recipe (the trusted path), otherwise from the published manifest; the 8-hex tag in every
file name is checked against it too, and the cache re-verifies the sha256 on every load.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from quantlib.io import atomic_write_text
from zoo import hub
from zoo.card import ModelCard

_SUFFIXES = {"onnx": ".onnx", "encodings": ".encodings.json", "weights": ".safetensors"}


def newest_record(results_dir: Path, model: str, recipe: str) -> dict[str, Any]:
    """The newest run record of ``model/recipe`` in ``results_dir/runs``."""
    paths = sorted((Path(results_dir) / "runs").glob(f"{model}__{recipe}__*.json"))
    if not paths:
        raise hub.HubError(f"no run record for {model}/{recipe} in {results_dir}/runs; run `quantzoo run {model}/{recipe}` first")
    return json.loads(paths[-1].read_text())


def publish(record: dict[str, Any], destination: Path) -> Path:
    """Copy a run's artifacts into ``destination/<model>/<recipe>/`` with sha-tagged names; returns the folder."""
    folder = Path(destination) / record["model"] / record["recipe"]
    entries = {}
    for kind, artifact in sorted(record["artifacts"].items()):
        source = Path(artifact["path"])
        hub.verify_file(source, artifact["sha256"])
        name = hub.sha_tagged_name(f"{record['model']}-{record['recipe']}", artifact["sha256"], _SUFFIXES[kind])
        hub.atomic_copy(source, folder / name)
        entries[kind] = {"filename": name, "sha256": artifact["sha256"], "bytes": artifact["bytes"]}
    manifest = {"model": record["model"], "recipe": record["recipe"], "run_id": record["run_id"],
                "artifacts": entries, "metrics": {k: v["top1"] for k, v in record["metrics"].items()}}
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return folder


def _manifest(card: ModelCard, recipe: str, mirror: str | None, offline: bool) -> dict[str, Any]:
    relative = f"{card.name}/{recipe}/manifest.json"
    cached = hub.cache_path(relative)
    if offline:
        if not cached.is_file():
            raise hub.OfflineError(cached)
        return json.loads(cached.read_text())
    url = hub.resolve_url(card.hub_base_url, relative, mirror)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - http(s)/file only
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        if err.code in (404, 410):
            raise hub.ArtifactNotFoundError(url) from None
        raise hub.DownloadError(url, 1, err) from None
    except (urllib.error.URLError, OSError) as err:
        raise hub.DownloadError(url, 1, err) from None
    hub.atomic_write_bytes(cached, text.encode("utf-8"))
    return json.loads(text)


def download(card: ModelCard, recipe: str, *, to: Path | None = None, mirror: str | None = None,
             offline: bool | None = None) -> dict[str, Path]:
    """Fetch (or take from the cache) every artifact of ``card``/``recipe``; returns kind -> path."""
    offline = hub.is_offline(offline)
    listed = {a.kind: (a.filename, a.sha256) for a in card.artifacts_for(recipe)}
    if not listed:
        manifest = _manifest(card, recipe, mirror, offline)
        listed = {kind: (entry["filename"], entry["sha256"]) for kind, entry in manifest["artifacts"].items()}
    paths = {}
    for kind, (filename, sha256) in sorted(listed.items()):
        path = hub.cached_artifact(f"{card.name}/{recipe}/{filename}", base_url=card.hub_base_url,
                                   sha256=sha256, mirror=mirror, offline=offline)
        if to is not None:
            target = Path(to) / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            path = target
        paths[kind] = path
    return paths
