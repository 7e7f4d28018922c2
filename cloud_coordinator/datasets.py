"""Data for experiments: load, split server/device data, partition a fleet, write device files.

Only the data sets shipped inside scikit-learn are used (nothing is downloaded). For a
template and a seed the samples are split once, deterministically and stratified, into

* the **holdout** (`HOLDOUT_FRACTION`), kept by the server to evaluate each version;
* the **pretrain** split (``template.server_fraction``), kept by the server to fit the
  frozen backbone; empty when the template has no backbone;
* the **device pool**: everything else, partitioned among the devices.

The three never overlap, and the same seed gives the same split. A device's data is two
files, ``train.npz`` and ``val.npz``, each holding ``x`` (float32, the model's input shape,
already preprocessed) and ``y`` (int64 class indices) -- what a real device would hold.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cloud_coordinator.templates import Template
from protocols.topics import check_id

HOLDOUT_FRACTION = 0.2
TRAIN_FILE = "train.npz"
VAL_FILE = "val.npz"
SCHEMES = ("iid", "dirichlet")
_MAX_DRAWS = 100

IndexArray = npt.NDArray[np.int64]
Features = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Samples:
    """Inputs `x`, labels `y`, and `index`: each row's number in the full data set."""

    x: Features
    y: Labels
    index: IndexArray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, rows: npt.NDArray[np.integer]) -> Samples:
        """The subset at positions `rows` of this one."""
        return Samples(self.x[rows], self.y[rows], self.index[rows])


@dataclass(frozen=True, eq=False)
class ServerData:
    """What the coordinator keeps: the holdout and the backbone's pretraining split."""

    holdout: Samples
    pretrain: Samples


def preprocess(template: Template, raw: npt.NDArray[np.floating]) -> Features:
    """Raw rows -> model inputs: ``raw * scale + offset``, reshaped to the input shape."""
    scale = float(template.preprocessing.get("scale", 1.0))
    offset = float(template.preprocessing.get("offset", 0.0))
    x = np.asarray(raw, dtype=np.float64) * scale + offset
    return np.ascontiguousarray(x.reshape((len(x), *template.input_shape)), dtype=np.float32)


def load_dataset(template: Template) -> Samples:
    """The template's whole data set, preprocessed."""
    # (scikit-learn is imported here, not above: it costs a coordinator start about 1 s)
    from sklearn.datasets import load_breast_cancer, load_digits

    if template.dataset == "digits":
        raw, target = load_digits(return_X_y=True)
    else:
        raw, target = load_breast_cancer(return_X_y=True)
    y = np.asarray(target, dtype=np.int64)
    return Samples(preprocess(template, raw), y, np.arange(len(y), dtype=np.int64))


def split_holdout(
    x: npt.NDArray[np.generic], y: npt.NDArray[np.integer], fraction: float, seed: int
) -> tuple[IndexArray, IndexArray]:
    """Stratified, deterministic ``(kept, holdout)`` row indices, each sorted."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if not 0.0 < fraction < 1.0:
        raise ValueError("fraction must be in (0, 1)")
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(y), dtype=np.int64)
    kept, held = train_test_split(rows, test_size=fraction, random_state=seed, stratify=y)
    return np.sort(np.asarray(kept, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def _split(template: Template, seed: int) -> tuple[Samples, Samples, Samples]:
    full = load_dataset(template)
    rest, held = split_holdout(full.x, full.y, HOLDOUT_FRACTION, seed)
    holdout, pool = full.take(held), full.take(rest)
    if template.server_fraction == 0.0:
        return holdout, pool.take(np.arange(0)), pool
    share = template.server_fraction / (1.0 - HOLDOUT_FRACTION)
    devices, server = split_holdout(pool.x, pool.y, share, seed + 1)
    return holdout, pool.take(server), pool.take(devices)


def server_data(template: Template, seed: int) -> ServerData:
    """The server's holdout and pretraining split; disjoint from `device_pool` (same seed)."""
    holdout, pretrain, _ = _split(template, seed)
    return ServerData(holdout, pretrain)


def device_pool(template: Template, seed: int) -> Samples:
    """All samples the devices may hold, for this seed: the data set less `server_data`."""
    return _split(template, seed)[2]


def _dirichlet(
    labels: Labels, n_devices: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    shards: list[list[int]] = [[] for _ in range(n_devices)]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(n_devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
        for shard, part in zip(shards, np.split(rows, cuts), strict=True):
            shard.extend(int(r) for r in part)
    return shards


def _top_up(shards: list[list[int]], minimum: int, rng: np.random.Generator) -> None:
    """Move random samples from the largest shards to those under `minimum`."""
    for shard in shards:
        while len(shard) < minimum:
            donor = max(shards, key=len)
            shard.append(donor.pop(int(rng.integers(len(donor)))))


def partition(
    labels: npt.NDArray[np.integer],
    n_devices: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_per_device: int = 1,
) -> list[IndexArray]:
    """Split rows ``0..len(labels)-1`` among devices: disjoint, complete, sorted, seeded.

    ``iid`` shuffles and deals equal shares. ``dirichlet`` draws, for every class, the
    devices' shares from Dirichlet(alpha) (smaller alpha, stronger label skew); draws that
    leave a device under `min_per_device` are redrawn, and after `_MAX_DRAWS` the smallest
    devices are topped up from the largest.
    """
    y = np.asarray(labels, dtype=np.int64)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if n_devices < 1:
        raise ValueError("n_devices must be >= 1")
    if alpha <= 0.0:
        raise ValueError("alpha must be > 0")
    if n_devices * min_per_device > len(y):
        raise ValueError(f"{len(y)} samples cannot give {n_devices} devices {min_per_device} each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        shards = [list(part) for part in np.array_split(rng.permutation(len(y)), n_devices)]
    else:
        for _ in range(_MAX_DRAWS):
            shards = _dirichlet(y, n_devices, alpha, rng)
            if min(len(shard) for shard in shards) >= min_per_device:
                break
        _top_up(shards, min_per_device, rng)
    return [np.sort(np.asarray(shard, dtype=np.int64)) for shard in shards]


def _save(path: Path, x: Features, y: Labels) -> None:
    """Write an ``.npz`` with arrays ``x`` and ``y`` atomically (temp file, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, x=x, y=y)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_device_data(
    directory: Path,
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.integer],
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write `directory`/train.npz and val.npz (a seeded random split); return both paths."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    rows = np.random.default_rng(seed).permutation(len(y))
    n_val = min(round(val_fraction * len(y)), len(y) - 1) if len(y) else 0
    if val_fraction > 0.0 and len(y) >= 2:
        n_val = max(n_val, 1)
    val_rows, train_rows = np.sort(rows[:n_val]), np.sort(rows[n_val:])
    xs = np.asarray(x, dtype=np.float32)
    ys = np.asarray(y, dtype=np.int64)
    directory.mkdir(parents=True, exist_ok=True)
    train, val = directory / TRAIN_FILE, directory / VAL_FILE
    _save(train, xs[train_rows], ys[train_rows])
    _save(val, xs[val_rows], ys[val_rows])
    return train, val


def read_device_file(path: Path) -> tuple[Features, Labels]:
    """``(x, y)`` from a file written by `write_device_data` (never unpickles)."""
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    if x.dtype != np.float32 or y.dtype != np.int64 or len(x) != len(y):
        raise ValueError(f"{path} does not hold float32 x and int64 y of equal length")
    return x, y


def device_ids(n_devices: int) -> list[str]:
    """``agent-01`` .. ``agent-NN`` (at least two digits)."""
    width = max(2, len(str(n_devices)))
    return [check_id(f"agent-{i:0{width}d}", "device id") for i in range(1, n_devices + 1)]


def prepare_fleet(
    template: Template,
    n_devices: int,
    scheme: str,
    alpha: float,
    seed: int,
    out_dir: Path,
    *,
    val_fraction: float = 0.2,
    min_per_device: int = 10,
) -> list[Path]:
    """Partition `device_pool` and write each device's files to `out_dir`/<device id>/."""
    pool = device_pool(template, seed)
    shards = partition(pool.y, n_devices, scheme, alpha, seed, min_per_device)
    directories = []
    for number, (device, rows) in enumerate(zip(device_ids(n_devices), shards, strict=True)):
        directory = out_dir / device
        part = pool.take(rows)
        split_seed = int(np.random.SeedSequence((seed, number)).generate_state(1)[0])
        write_device_data(directory, part.x, part.y, val_fraction, split_seed)
        directories.append(directory)
    return directories
