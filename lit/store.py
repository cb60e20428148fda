"""Feature stores: descriptor features on disk in shards, memory-mapped for search.

A store is a folder the suite marks as its own::

    STORE/
      .lit-store.json            marker: format, version, descriptor record, dtype, feature shape
      shard-000000.npy           (rows, *feature_shape) float16 (default) or float32
      shard-000000.json          the shard's rows: keys, captions, labels, skipped inputs, sha256
      ...
      manifest.json              written by finalize(): every shard in global order, counts, checksums
                                 (the .npy's SHA-256 and size, the row file's SHA-256)

A shard is complete when its ``.json`` exists (written after the ``.npy``, both via a
temporary file and ``os.replace``), so a killed writer leaves only whole shards plus
temporary files that the next writer removes. Shards are ordered by their ``start``
(a global row index of the input, so the order does not depend on how many processes
wrote them), then by name. Rows are read through ``np.load(mmap_mode="r")``: a store
is never loaded whole (``iter_blocks`` for scans, ``rows`` to gather a shortlist), and
nothing of it is used unchecked (:class:`FeatureStore`: sizes on open, checksums and finite
rows before a shard's first use; a damaged store is one :class:`DamagedStoreError` line).

Cost on disk: ``prod(feature_shape) * itemsize`` bytes a row plus a 128-byte ``.npy``
header per shard: 512-d float16 is 1 KiB an image (12M images: 12 GiB); DINO ViT-B/16
tokens (197, 768) float16 are 296 KiB (303 kB) an image.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit.choices import DTYPES
from lit.errors import UserError
from lit.files import claim_folder, write_bytes_atomic, write_json

FORMAT = "lit-feature-store"
VERSION = 1
MARKER = ".lit-store.json"
MANIFEST = "manifest.json"
#: How two descriptor records differ where it matters for their features (empty: comparable). The store
#: does not know what a descriptor is: its callers pass ``models.descriptor_config.DescriptorConfig.differences``.
RecordComparison = Callable[[Mapping[str, Any], Mapping[str, Any]], list[str]]
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TEMP_FILE = re.compile(r"^\.(shard-.*|manifest\.json|\.lit-store\.json)\..*\.tmp$")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it."""

    name: str
    rows: int
    sha256: str
    start: int | None
    skipped: tuple[str, ...]
    source: str | None = None
    info: Mapping[str, Any] | None = None

    @property
    def file(self) -> str:
        return f"shard-{self.name}.npy"

    @property
    def meta_file(self) -> str:
        return f"shard-{self.name}.json"


def _normalise_dtype(dtype: str | np.dtype | torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise UserError(f"feature store dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def _is_store(root: Path) -> bool:
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _as_numpy(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        return features.detach().to("cpu", torch.float32).numpy()
    return np.asarray(features)


# --------------------------------------------------------------------------- writing


class StoreWriter:
    """Writes shards into a store folder (new, empty, or an existing store of the same descriptor).

    Args:
        root: the store folder; created when missing. An existing folder must be empty or
            a store with the same descriptor, dtype and feature shape (then shards are added).
        descriptor_record: ``DescriptorConfig.record()`` of the descriptor that made the features.
        feature_shape: ``(D,)`` for global features, ``(T, D)`` for tokens.
        dtype: ``float16`` (default, half the disk) or ``float32``.
        clean: remove the temporary files a killed writer left (only one process of a
            multi-process run may do this, before any of them writes).
        compare: how two descriptor records differ (``DescriptorConfig.differences``), to refuse
            adding to a store made by another descriptor.
    """

    def __init__(
        self,
        root: str | Path,
        descriptor_record: Mapping[str, Any],
        feature_shape: Sequence[int],
        dtype: str = "float16",
        clean: bool = True,
        *,
        compare: RecordComparison,
    ) -> None:
        self.root = Path(root)
        self.clean = clean
        self.compare = compare
        self.descriptor = dict(descriptor_record)
        self.feature_shape = tuple(int(s) for s in feature_shape)
        if not self.feature_shape or any(s < 1 for s in self.feature_shape):
            raise ValueError(f"feature_shape must be positive sizes, got {feature_shape}")
        self.dtype = _normalise_dtype(dtype)
        self._open()

    def _open(self) -> None:
        refusal = (f"refusing to write a feature store into {self.root}: it holds files the suite did not "
                   "create ({found}); choose an empty or new folder")
        if claim_folder(self.root, MARKER, label=f"feature store {self.root}", refusal=refusal, is_ours=_is_store,
                        ignorable=_TEMP_FILE.match):
            marker = json.loads((self.root / MARKER).read_text())
            self._check_same(marker)
            if self.clean:
                self._remove_temporaries()
            return
        write_json(self.root / MARKER, {
            "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "descriptor": self.descriptor, "dtype": self.dtype, "feature_shape": list(self.feature_shape),
        })

    def _check_same(self, marker: Mapping[str, Any]) -> None:
        problems = self.compare(marker.get("descriptor", {}), self.descriptor)
        if marker.get("dtype") != self.dtype:
            problems.append(f"dtype {marker.get('dtype')} vs {self.dtype}")
        if tuple(marker.get("feature_shape", ())) != self.feature_shape:
            problems.append(f"feature shape {tuple(marker.get('feature_shape', ()))} vs {self.feature_shape}")
        if problems:
            raise UserError(
                f"feature store {self.root} was written with other settings ({'; '.join(problems)}); "
                "use another folder or the same descriptor, weights and dtype"
            )

    def _remove_temporaries(self) -> None:
        """Temporary files of a killed writer (ours: the folder is a marked store)."""
        for path in self.root.iterdir():
            if _TEMP_FILE.match(path.name):
                path.unlink(missing_ok=True)

    def shard_meta(self, name: str) -> dict[str, Any] | None:
        """The row file of a completely written shard ``name`` (None when it is not there)."""
        return json.loads((self.root / f"shard-{name}.json").read_text()) if self.has_shard(name) else None

    def has_shard(self, name: str) -> bool:
        """Whether shard ``name`` was completely written (its row file exists beside a whole ``.npy``)."""
        return (self.root / f"shard-{name}.json").is_file() and (self.root / f"shard-{name}.npy").is_file()

    def write_shard(
        self,
        name: str,
        features: np.ndarray | torch.Tensor,
        keys: Sequence[str],
        captions: Sequence[str | None] | None = None,
        labels: Sequence[Any] | None = None,
        skipped: Sequence[str] = (),
        start: int | None = None,
        source: str | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> ShardInfo:
        """Write one shard atomically; rewriting an identical existing shard is a no-op.

        ``start`` is the shard's first global input row: shards are ordered by it in the
        manifest (shards without one come last, by name). ``skipped`` names the inputs of this
        shard that could not be read; ``source`` is the input file it came from (a tar shard);
        ``info`` is any small JSON-able description kept with it.
        """
        if not _SHARD_NAME.match(name):
            raise ValueError(f"shard name must be letters, digits, '_', '-', '.', got {name!r}")
        array = _as_numpy(features)
        if array.ndim != 1 + len(self.feature_shape) or tuple(array.shape[1:]) != self.feature_shape:
            raise ValueError(f"shard {name}: features of shape {array.shape}, expected (rows, *{self.feature_shape})")
        rows = int(array.shape[0])
        for label, column in (("keys", keys), ("captions", captions), ("labels", labels)):
            if column is not None and len(column) != rows:
                raise ValueError(f"shard {name}: {len(column)} {label} for {rows} rows")
        with np.errstate(over="ignore", invalid="ignore"):
            stored = np.ascontiguousarray(array, dtype=self.dtype)
        if not np.isfinite(stored).all():
            bad = "overflow float16 (use dtype float32)" if np.isfinite(array).all() else "are not finite"
            raise ValueError(f"shard {name}: features {bad}")
        meta = {
            "name": name, "rows": rows, "start": start,
            "keys": [str(k) for k in keys],
            "captions": None if captions is None else [None if c is None else str(c) for c in captions],
            "labels": None if labels is None else [v.item() if isinstance(v, np.generic) else v for v in labels],
            "skipped": [str(s) for s in skipped],
            "source": source,
            "info": None if info is None else dict(info),
        }
        npy, meta_path = self.root / f"shard-{name}.npy", self.root / f"shard-{name}.json"
        buffer = io.BytesIO()
        np.save(buffer, stored, allow_pickle=False)
        data = buffer.getvalue()
        meta["sha256"] = hashlib.sha256(data).hexdigest()
        if self.has_shard(name):
            existing = json.loads(meta_path.read_text())
            if existing == meta:
                return _shard_info(existing)  # the same shard again (a rerun): nothing to do
            raise UserError(
                f"shard {npy} already exists with other content; remove the store {self.root} "
                "or write into a new folder"
            )
        write_bytes_atomic(npy, data)  # a row file without its .json (killed writer) is simply replaced
        write_json(meta_path, meta)
        return _shard_info(meta)

    def finalize(self, extra: Mapping[str, Any] | None = None,
                 skipped_entries: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """Write ``manifest.json`` from the complete shards present (ordered by ``start``, then name).

        ``skipped_entries`` are inputs skipped before any shard (an input folder's dangling symlinks,
        folders named like images): ``(name, reason)``, listed as ``skipped_entries`` and counted in
        ``num_skipped`` with the shards' unreadable images."""
        shards, checks = [], {}
        for meta_path in sorted(self.root.glob("shard-*.json")):
            text = meta_path.read_bytes()
            meta = json.loads(text)
            npy = self.root / f"shard-{meta['name']}.npy"
            if not npy.is_file():
                continue
            shards.append(_shard_info(meta))
            checks[meta["name"]] = {"bytes": npy.stat().st_size, "meta_sha256": hashlib.sha256(text).hexdigest()}
        shards.sort(key=lambda s: (s.start is None, s.start if s.start is not None else 0, s.name))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "descriptor": self.descriptor,
            "dtype": self.dtype,
            "feature_shape": list(self.feature_shape),
            "num_rows": sum(s.rows for s in shards),
            "num_skipped": sum(len(s.skipped) for s in shards) + len(skipped_entries),
            "skipped_entries": [{"name": str(name), "reason": str(reason)} for name, reason in skipped_entries],
            "bytes_per_row": int(np.prod(self.feature_shape)) * np.dtype(self.dtype).itemsize,
            "shards": [
                {"name": s.name, "file": s.file, "rows": s.rows, "start": s.start, "sha256": s.sha256,
                 **checks[s.name], "skipped": list(s.skipped),
                 **({"source": s.source} if s.source is not None else {}),
                 **({"info": dict(s.info)} if s.info is not None else {})}
                for s in shards
            ],
            **({"extra": dict(extra)} if extra else {}),
        }
        write_json(self.root / MANIFEST, manifest)
        return manifest


def _shard_info(meta: Mapping[str, Any]) -> ShardInfo:
    return ShardInfo(
        name=meta["name"], rows=int(meta["rows"]), sha256=meta["sha256"], start=meta.get("start"),
        skipped=tuple(meta.get("skipped", ())), source=meta.get("source"), info=meta.get("info"),
    )


# --------------------------------------------------------------------------- reading


class DamagedStoreError(UserError):
    """A store whose manifest, shards or row files are not what its manifest says (one line: the
    store, the file and what is wrong in ``what``, and what to do)."""

    def __init__(self, root: Path, what: str) -> None:
        super().__init__(f"feature store {root} is damaged: {what}; remove it and extract the features again")
        self.root, self.what = root, what

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (the message is rebuilt from root and what)
        return DamagedStoreError, (self.root, self.what)


def _damaged(root: Path, what: str) -> DamagedStoreError:
    return DamagedStoreError(root, what)


_CHECK_BYTES = 2**18
"""Bytes of a shard hashed and checked for NaN / inf at a time (see :meth:`FeatureStore.check_shard`)."""
_EXPONENT_BITS = {"float16": (np.uint16, np.uint16(0x7C00)), "float32": (np.uint32, np.uint32(0x7F800000))}
"""Unsigned view and exponent mask of each stored dtype: a value is NaN or inf when all its exponent bits are set."""


class FeatureStore:
    """A finalized store, read through memory maps (never loaded whole).

    Nothing is used unchecked: :meth:`open` reads the manifest and checks that every shard and
    its row file exist and that each ``.npy`` has the dtype, shape and size the manifest lists
    (a header read and a ``stat``, no data); the first time any row of a shard is used (features,
    keys, captions or labels), :meth:`check_shard` hashes the shard (SHA-256 against the manifest,
    NaN / inf rows refused) and its row file (against the manifest's ``meta_sha256``; keys, rows
    and checksum against the manifest), once per opened store. A problem is a one-line
    :class:`DamagedStoreError` (a ``UserError``) naming the store and the file.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.shards = [_shard_info(s) for s in manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum([s.rows for s in self.shards], dtype=np.int64)])
        self._meta: dict[int, dict[str, Any]] = {}
        self._checked: set[int] = set()

    @classmethod
    def open(cls, root: str | Path) -> FeatureStore:
        """Open the store at ``root`` (a one-line ``UserError`` when it is not a finalized store, or when
        its manifest, a shard or a row file is missing, unreadable or of the wrong size)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            what = "an unfinished feature store (no manifest.json: rerun the extraction)" if _is_store(root) \
                else "not a feature store (no manifest.json)"
            raise UserError(f"{root} is {what}")
        try:
            manifest = json.loads(path.read_bytes())
        except (OSError, ValueError) as error:  # ValueError: JSONDecodeError and UnicodeDecodeError
            raise _damaged(root, f"{MANIFEST} cannot be read ({type(error).__name__}: {error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            if _is_store(root):
                raise _damaged(root, f"{MANIFEST} is not a feature-store manifest")
            raise UserError(f"{path} is not a feature-store manifest (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
        if not isinstance(manifest.get("version"), int):
            raise _damaged(root, f"{MANIFEST} lists no format version")
        if manifest["version"] > VERSION:
            raise UserError(f"{path} has store format version {manifest['version']}; this suite reads <= {VERSION}")
        store = cls(root, _checked_manifest(root, manifest))
        for i in range(len(store.shards)):
            store._check_files(i)
        return store

    # ------------------------------------------------------------------ description

    @property
    def descriptor(self) -> dict[str, Any]:
        return self.manifest["descriptor"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["feature_shape"])

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def skipped(self) -> list[str]:
        """Every skipped input: the entries skipped before extraction (``skipped_entries``), then each
        shard's unreadable images."""
        entries = [str(entry.get("name")) for entry in self.manifest.get("skipped_entries") or ()
                   if isinstance(entry, dict)]
        return entries + [name for shard in self.shards for name in shard.skipped]

    @property
    def skipped_reasons(self) -> dict[str, str]:
        """Every skipped input with the reason it was skipped (the order of :attr:`skipped`)."""
        reasons = {str(entry.get("name")): str(entry.get("reason"))
                   for entry in self.manifest.get("skipped_entries") or () if isinstance(entry, dict)}
        for shard in self.shards:
            for name in shard.skipped:
                reasons.setdefault(name, "could not be read as an image")
        return reasons

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.root)!r}, rows={self.num_rows}, shape={self.feature_shape}, "
                f"dtype={self.dtype}, descriptor={self.descriptor.get('name')!r}, shards={len(self.shards)})")

    # ------------------------------------------------------------------ row metadata

    def _shard_meta(self, i: int) -> dict[str, Any]:
        self.check_shard(i)
        return self._meta[i]

    # ------------------------------------------------------------------ verification

    def _check_files(self, i: int) -> None:
        """Shard ``i``'s ``.npy`` and row file exist; the ``.npy`` header says the manifest's dtype and
        shape, and its size is that header plus the rows (no data read)."""
        shard = self.shards[i]
        for name in (shard.file, shard.meta_file):
            if not (self.root / name).is_file():
                raise _damaged(self.root, f"{name} is missing")
        path = self.root / shard.file
        expected = (shard.rows, *self.feature_shape)
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(handle)
                header = handle.tell()
        except (OSError, ValueError) as error:
            raise _damaged(self.root, f"{shard.file} is not a readable .npy file ({error})") from None
        if tuple(shape) != expected or dtype != self.dtype or fortran:
            raise _damaged(self.root, f"{shard.file} holds {dtype} {tuple(shape)}, the manifest says "
                           f"{self.dtype} {expected} (a shard of another store?)")
        size = path.stat().st_size
        want = header + shard.rows * int(np.prod(self.feature_shape)) * self.dtype.itemsize
        recorded = self.manifest["shards"][i].get("bytes")
        if size != want or (recorded is not None and size != recorded):
            state = "truncated" if size < want else "longer than its rows"
            raise _damaged(self.root, f"{shard.file} is {state} ({size} bytes, expected {want})")

    def check_shard(self, i: int, *, again: bool = False) -> None:
        """Check shard ``i`` against the manifest before its rows are used (once per opened store;
        ``again``: even when checked before): the ``.npy``'s SHA-256 (read through its memory map,
        :data:`_CHECK_BYTES` at a time) and finite rows; the row file's SHA-256 (manifests that
        record one), rows, keys and checksum."""
        if i in self._checked and not again:
            return
        shard, listed = self.shards[i], self.manifest["shards"][i]
        self._check_files(i)
        meta_path = self.root / shard.meta_file
        text = meta_path.read_bytes()
        if listed.get("meta_sha256") is not None and hashlib.sha256(text).hexdigest() != listed["meta_sha256"]:
            raise _damaged(self.root, f"{shard.meta_file} (its keys) does not match its checksum in the manifest")
        try:
            meta = json.loads(text)
        except ValueError as error:
            raise _damaged(self.root, f"{shard.meta_file} cannot be read ({error})") from None
        columns = {field: meta.get(field) for field in ("keys", "captions", "labels")} if isinstance(meta, dict) else {}
        if (not isinstance(meta, dict) or meta.get("sha256") != shard.sha256 or meta.get("rows") != shard.rows
                or not isinstance(columns["keys"], list)
                or any(v is not None and (not isinstance(v, list) or len(v) != shard.rows) for v in columns.values())):
            raise _damaged(self.root, f"{shard.meta_file} does not describe the shard the manifest lists "
                           "(another store's row file?)")
        array = self._map(i)
        digest = hashlib.sha256()
        with open(self.root / shard.file, "rb") as handle:
            digest.update(handle.read(array.offset))
        step = max(1, _CHECK_BYTES // max(1, array[:1].nbytes))
        bits, exponent = _EXPONENT_BITS[self.dtype.name]
        buffer = np.empty((min(step, shard.rows), int(np.prod(self.feature_shape))), dtype=bits)
        for start in range(0, shard.rows, step):
            chunk = array[start: start + step]
            digest.update(chunk)
            # NaN / inf: every exponent bit set (4x faster than np.isfinite on float16)
            masked = np.bitwise_and(chunk.reshape(len(chunk), -1).view(bits), exponent, out=buffer[: len(chunk)])
            if (masked == exponent).any():
                row = start + int(np.argmax((masked == exponent).any(axis=1)))
                raise _damaged(self.root, f"{shard.file} row {row} ({meta['keys'][row]!r}) holds NaN or inf")
        del array
        if digest.hexdigest() != shard.sha256:
            raise _damaged(self.root, f"{shard.file} does not match its checksum in the manifest "
                           "(changed on disk, or another store's shard)")
        self._meta[i] = meta
        self._checked.add(i)

    def _column(self, field: str) -> list[Any] | None:
        """A row column over all shards; rows of shards without it are None; None when no shard has it."""
        values: list[Any] = []
        known = False
        for i, shard in enumerate(self.shards):
            column = self._shard_meta(i).get(field)
            known = known or column is not None
            values.extend([None] * shard.rows if column is None else column)
        return values if known or field == "keys" else None

    @property
    def keys(self) -> list[str]:
        """Every row's image key / path, in row order (reads every shard's row file once)."""
        return self._column("keys") or []

    @property
    def captions(self) -> list[str | None] | None:
        """Every row's caption (None for rows without one), or None when the store has none."""
        return self._column("captions")

    @property
    def labels(self) -> list[Any] | None:
        """Every row's class label (None for rows without one), or None when the store has none."""
        return self._column("labels")

    def keys_at(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """Keys of the given rows, reading only the shards they fall in."""
        return [self._shard_meta(s)["keys"][r] for s, r in zip(*self._locate(np.asarray(indices, dtype=np.int64)))]

    def captions_at(self, indices: Sequence[int] | np.ndarray) -> list[str | None] | None:
        """Captions of the given rows (None when the store has none)."""
        located = list(zip(*self._locate(np.asarray(indices, dtype=np.int64))))
        if all(self._shard_meta(i).get("captions") is None for i in range(len(self.shards))):
            return None
        columns = [self._shard_meta(s).get("captions") for s, _ in located]
        return [None if column is None else column[r] for column, (_, r) in zip(columns, located)]

    # ------------------------------------------------------------------ features

    def shard_array(self, i: int) -> np.ndarray:
        """Shard ``i``'s features as a read-only memory map (checked first: :meth:`check_shard`).

        Not cached: the pages a scan touches count in the process's resident memory for as long
        as the map lives, so every read maps, copies what it needs and lets the map go."""
        self.check_shard(i)
        return self._map(i)

    def _map(self, i: int) -> np.memmap:
        try:
            array = np.load(self.root / self.shards[i].file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:  # changed since it was opened
            raise _damaged(self.root, f"{self.shards[i].file} cannot be mapped ({error})") from None
        if array.shape != (self.shards[i].rows, *self.feature_shape) or array.dtype != self.dtype:
            raise _damaged(self.root, f"{self.shards[i].file} holds {array.dtype} {array.shape}, the manifest says "
                           f"{self.dtype} ({self.shards[i].rows}, *{self.feature_shape})")
        return array

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"row index out of range for a store of {self.num_rows} rows")
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        return shard, indices - self.offsets[shard]

    def iter_blocks(self, block_rows: int, dtype: str | np.dtype | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, block)`` over the whole store; each block is an in-memory copy of at
        most ``block_rows`` rows (``dtype``: convert, e.g. ``np.float32``; default the stored dtype)."""
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        out_dtype = self.dtype if dtype is None else np.dtype(dtype)
        # each shard is checked before its rows are used, the next one in a thread while the caller works
        # on this one's blocks (hashlib and numpy release the GIL): the check costs a scan little wall time
        pending: dict[int, Future[None]] = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-check") as pool:
            def check(i: int) -> None:
                if i < len(self.shards) and i not in self._checked and i not in pending:
                    pending[i] = pool.submit(self.check_shard, i)

            try:
                for start in range(0, self.num_rows, block_rows):
                    stop = min(start + block_rows, self.num_rows)
                    first = int(np.searchsorted(self.offsets, start, side="right") - 1)
                    last = int(np.searchsorted(self.offsets, stop - 1, side="right") - 1)
                    for i in range(first, last + 2):
                        check(i)
                    for i in range(first, last + 1):
                        if i in pending:
                            pending.pop(i).result()
                    yield start, self.slice(start, stop, out_dtype)
            finally:
                for future in pending.values():
                    future.cancel()

    def slice(self, start: int, stop: int, dtype: str | np.dtype | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` as an in-memory array."""
        out_dtype = self.dtype if dtype is None else np.dtype(dtype)
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) out of range for a store of {self.num_rows} rows")
        out = np.empty((stop - start, *self.feature_shape), dtype=out_dtype)
        first = int(np.searchsorted(self.offsets, start, side="right") - 1) if stop > start else 0
        position = start
        for i in range(first, len(self.shards)):
            if position >= stop:
                break
            begin, end = int(self.offsets[i]), int(self.offsets[i + 1])
            take = min(stop, end) - position
            if take <= 0:
                continue
            shard = self.shard_array(i)
            out[position - start: position - start + take] = shard[position - begin: position - begin + take]
            del shard
            position += take
        return out

    def rows(self, indices: Sequence[int] | np.ndarray, dtype: str | np.dtype | None = None) -> np.ndarray:
        """Gather arbitrary rows (any order, repeats allowed) into an in-memory array."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((indices.size, *self.feature_shape), dtype=self.dtype if dtype is None else np.dtype(dtype))
        shard, local = self._locate(indices)
        for i in np.unique(shard):
            where = np.nonzero(shard == i)[0]
            order = np.argsort(local[where], kind="stable")  # ascending reads from the memory map
            out[where[order]] = self.shard_array(int(i))[local[where[order]]]
        return out

    def verify(self) -> None:
        """:meth:`check_shard` every shard again (reads the whole store from disk)."""
        for i in range(len(self.shards)):
            self.check_shard(i, again=True)

    # ------------------------------------------------------------------ compatibility

    def check_compatible(self, other: FeatureStore | Mapping[str, Any], compare: RecordComparison,
                         what: str = "") -> None:
        """Raise a one-line ``UserError`` unless ``other`` (a store or a descriptor record) was made by a
        descriptor whose record ``compare`` (``DescriptorConfig.differences``) finds no difference with
        this store's (and, for a store, with the same dtype and feature shape)."""
        theirs = other.descriptor if isinstance(other, FeatureStore) else other
        problems = list(compare(self.descriptor, theirs))
        if isinstance(other, FeatureStore):
            if other.dtype != self.dtype:
                problems.append(f"dtype {self.dtype} vs {other.dtype}")
            if other.feature_shape != self.feature_shape:
                problems.append(f"feature shape {self.feature_shape} vs {other.feature_shape}")
        if problems:
            label = what or (str(other.root) if isinstance(other, FeatureStore) else "the given descriptor")
            raise UserError(f"feature store {self.root} does not match {label}: {'; '.join(problems)}")


def _checked_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` when it has the fields a store is read by (a damaged-store error otherwise)."""
    shape = manifest.get("feature_shape")
    problem = None
    if manifest.get("dtype") not in DTYPES:
        problem = f"dtype {manifest.get('dtype')!r}"
    elif not isinstance(shape, list) or not shape or not all(isinstance(n, int) and n > 0 for n in shape):
        problem = f"feature_shape {shape!r}"
    elif not isinstance(manifest.get("descriptor"), dict):
        problem = "no descriptor record"
    elif not isinstance(manifest.get("shards"), list):
        problem = "no list of shards"
    else:
        for entry in manifest["shards"]:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and _SHARD_NAME.match(entry["name"])
                    and isinstance(entry.get("rows"), int) and entry["rows"] >= 0
                    and isinstance(entry.get("sha256"), str)):
                problem = f"shard entry {json.dumps(entry)[:80]}"
                break
    if problem is not None:
        raise _damaged(root, f"{MANIFEST} lists {problem}")
    return manifest


def open_store(root: str | Path) -> FeatureStore:
    """Shorthand for :meth:`FeatureStore.open`."""
    return FeatureStore.open(root)


def is_store(root: str | Path) -> bool:
    """Whether ``root`` is a folder this suite created as a feature store (finalized or not)."""
    return _is_store(Path(root))


__all__ = [
    "DTYPES", "DamagedStoreError", "FeatureStore", "RecordComparison", "ShardInfo", "StoreWriter", "is_store",
    "open_store",
]
