"""`quantzoo publish` and `quantzoo download`: optimized artifacts through any static file server.

Layout (what publish writes and download reads), under a base URL or folder:
    <model>/<recipe>/manifest.json
    <model>/<recipe>/<model>-<recipe>-<sha256[:8]>.onnx | .encodings.json | .safetensors
The sha256 that download verifies comes from the model card's ``artifacts`` when the card lists
the recipe (the trusted path), otherwise from the published manifest; the 8-hex tag in every
file name is checked against it too, and the cache re-verifies the sha256 on every load.

The manifest also records what the artifacts were made with (``config.quant``, ``config.ptq``
and the FP32 weights' ``fp32_sha256``), so that ``quantzoo run ... checkpoint=...`` can refuse
artifacts of another recipe. :func:`fetch_published` gives a run the verified files, from the
hub (``checkpoint=download``) or from a folder written by :func:`publish`.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from quantlib.io import atomic_write_text
from zoo import hub
from zoo.card import ModelCard

_SUFFIXES = {"onnx": ".onnx", "encodings": ".encodings.json", "weights": ".safetensors"}
MANIFEST = "manifest.json"
DOWNLOAD = "download"  # the checkpoint= value that fetches from the hub instead of a folder
_REQUIRED_KINDS = ("encodings", "weights")  # what rebuilds the simulated model; onnx is for ORT


class PublishedArtifactsError(hub.HubError):
    """Published artifacts are missing, malformed or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class PublishedArtifacts:
    """One recipe's published artifacts on this machine, each file's sha256 verified.

    ``location``: where they came from (hub URL, cache folder or local folder); ``paths`` and
    ``sha256``: artifact kind (``onnx`` / ``encodings`` / ``weights``) -> local file and its
    sha256; ``manifest``: the publish manifest, or None when the card lists the artifacts and no
    manifest was fetched.
    """

    location: str
    paths: dict[str, Path]
    sha256: dict[str, str]
    manifest: dict[str, Any] | None


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
    config = record["provenance"]["config"]
    manifest = {"model": record["model"], "recipe": record["recipe"], "run_id": record["run_id"],
                "artifacts": entries, "metrics": {k: v["top1"] for k, v in record["metrics"].items()},
                "config": {group: config[group] for group in ("quant", "ptq", "compress") if group in config},
                "fp32_sha256": record["provenance"]["checkpoint_sha256"]}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
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


def _listing(card: ModelCard, recipe: str, mirror: str | None, offline: bool
             ) -> tuple[dict[str, tuple[str, str]], dict[str, Any] | None]:
    """kind -> (filename, sha256) from the card, else from the published manifest (also returned)."""
    listed = {a.kind: (a.filename, a.sha256) for a in card.artifacts_for(recipe)}
    if listed:
        return listed, None
    manifest = _manifest(card, recipe, mirror, offline)
    where = f"{card.name}/{recipe}/{MANIFEST}"
    return _manifest_listing(manifest, where), manifest


def download(card: ModelCard, recipe: str, *, to: Path | None = None, mirror: str | None = None,
             offline: bool | None = None) -> dict[str, Path]:
    """Fetch (or take from the cache) every artifact of ``card``/``recipe``; returns kind -> path."""
    return _download(card, recipe, to=to, mirror=mirror, offline=offline)[0]


def _download(card: ModelCard, recipe: str, *, to: Path | None, mirror: str | None, offline: bool | None
              ) -> tuple[dict[str, Path], dict[str, str], dict[str, Any] | None]:
    offline = hub.is_offline(offline)
    listed, manifest = _listing(card, recipe, mirror, offline)
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
    return paths, {kind: sha for kind, (_, sha) in listed.items()}, manifest


def _manifest_listing(manifest: Any, where: str) -> dict[str, tuple[str, str]]:
    """kind -> (filename, sha256) of a manifest; PublishedArtifactsError naming ``where`` if malformed."""
    artifacts = manifest.get("artifacts") if isinstance(manifest, dict) else None
    if not isinstance(artifacts, dict) or not artifacts:
        raise PublishedArtifactsError(f"{where} lists no artifacts; publish the run again with `quantzoo publish`")
    listed = {}
    for kind, entry in sorted(artifacts.items()):
        if kind not in _SUFFIXES or not isinstance(entry, dict) or not {"filename", "sha256"} <= set(entry):
            raise PublishedArtifactsError(
                f"{where}: artifacts.{kind} is not a {{filename, sha256}} entry of kind onnx, encodings or weights; "
                "publish the run again with `quantzoo publish`")
        name = str(entry["filename"])
        if PurePosixPath(name).name != name or name in ("", ".", ".."):
            raise PublishedArtifactsError(f"{where}: artifacts.{kind}.filename={name!r} must be a plain file name")
        try:
            hub.check_sha_tag(name, entry["sha256"])
        except ValueError as err:
            raise PublishedArtifactsError(f"{where}: artifacts.{kind}: {err}") from None
        listed[kind] = (name, str(entry["sha256"]).lower())
    return listed


def _local_manifest(source: Path, card: ModelCard, recipe: str) -> Path:
    """The manifest.json that ``checkpoint=<source>`` points at (file, recipe folder or publish root)."""
    if source.is_file():
        return source
    if not source.exists():
        raise PublishedArtifactsError(
            f"checkpoint={source} does not exist; use checkpoint={DOWNLOAD}, a folder written by `quantzoo publish`, "
            "or its manifest.json")
    candidates = [source / MANIFEST, source / card.name / recipe / MANIFEST]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PublishedArtifactsError(
        f"checkpoint={source} holds no {MANIFEST} (looked for {candidates[0]} and {candidates[1]}); "
        f"point checkpoint at a folder written by `quantzoo publish` or use checkpoint={DOWNLOAD}")


def _read_local(source: Path, card: ModelCard, recipe: str) -> tuple[dict[str, Path], dict[str, str], dict[str, Any], str]:
    manifest_path = _local_manifest(source, card, recipe)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PublishedArtifactsError(f"{manifest_path} is not a readable JSON manifest ({err}); publish the run again") from None
    listed = _manifest_listing(manifest, str(manifest_path))
    trusted = {a.kind: a.sha256 for a in card.artifacts_for(recipe)}
    if manifest.get("model") == card.name and manifest.get("recipe") == recipe:
        for kind, sha in sorted(trusted.items()):
            if kind in listed and listed[kind][1] != sha:
                raise PublishedArtifactsError(
                    f"{manifest_path}: artifacts.{kind}.sha256 is {listed[kind][1]} but model card {card.name} lists "
                    f"{sha} for {recipe}; these are not the card's published artifacts")
    paths, shas = {}, {}
    for kind, (filename, sha256) in sorted(listed.items()):
        path = manifest_path.parent / filename
        if not path.is_file():
            raise PublishedArtifactsError(f"{manifest_path} lists {filename}, which is missing next to it; copy the whole published folder")
        paths[kind], shas[kind] = hub.verify_file(path, sha256), sha256
    return paths, shas, manifest, str(manifest_path.parent.resolve())


def fetch_published(card: ModelCard, recipe: str, source: str, *, mirror: str | None = None,
                    offline: bool | None = None) -> PublishedArtifacts:
    """The verified published artifacts of ``card``/``recipe`` from ``source``.

    ``source`` is ``"download"`` (the hub, as :func:`download`: card sha256 else manifest, cache,
    ``mirror`` / ``QUANTZOO_MIRROR``, ``offline`` / ``QUANTZOO_OFFLINE``) or a local path: a
    folder written by :func:`publish` (its root or the ``<model>/<recipe>`` folder) or its
    ``manifest.json``. Every file's sha256 is checked; a bad file raises
    :class:`zoo.hub.ChecksumMismatchError`, a missing or malformed one :class:`PublishedArtifactsError`.
    Whether the artifacts fit the run's recipe is the caller's check (see ``manifest``).
    """
    if source == DOWNLOAD:
        paths, shas, manifest = _download(card, recipe, to=None, mirror=mirror, offline=offline)
        location = str(hub.cache_path(f"{card.name}/{recipe}")) if hub.is_offline(offline) else \
            hub.resolve_url(card.hub_base_url, f"{card.name}/{recipe}", mirror)
    else:
        paths, shas, manifest, location = _read_local(Path(source).expanduser(), card, recipe)
    missing = [kind for kind in _REQUIRED_KINDS if kind not in paths]
    if missing:
        raise PublishedArtifactsError(
            f"checkpoint={source}: the published {card.name}/{recipe} artifacts lack {', '.join(missing)}; "
            "publish a complete run with `quantzoo publish`")
    return PublishedArtifacts(location=location, paths=paths, sha256=shas, manifest=manifest)
