"""Images kept in a .npy file on disk and read one slice at a time.

A hospital's folder decoded at 224 px is 50 kB an image: 20,000 radiographs are 1 GB. A
memory-mapped array would count every page it touched in the process's resident memory, so a
pass over all images (frozen features, an epoch) would bring the whole file in. These arrays read
and write with pread/pwrite instead: the operating system's page cache holds what is hot and
gives it back under pressure, and the process holds only the batch in hand.

The files are ordinary .npy files (`np.load` opens them).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DTYPE = np.dtype(np.uint8)


class DiskImages:
    """A read-only uint8 array of images in a .npy file: (N, H, W) or (N, H, W, 3). Indexing
    with an int, a slice or an index array reads just those images."""

    def __init__(self, file: Path) -> None:
        self.file = Path(file)
        with self.file.open("rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if dtype != DTYPE or fortran:
            raise ValueError(f"{file}: expected a C-ordered uint8 array, got {dtype}")
        self.shape = tuple(shape)
        self.item = int(np.prod(self.shape[1:]))
        self._fd = os.open(self.file, os.O_RDONLY)

    dtype = DTYPE

    @property
    def identity(self) -> bytes:
        """What names these images without reading them: the file, its size and modification
        time (a site's cache file is written once, under a key of its sources, and never edited)."""
        stat = self.file.stat()
        return f"{self.file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, count: int) -> np.ndarray:
        data = os.pread(self._fd, count * self.item, self.offset + start * self.item)
        return np.frombuffer(data, dtype=DTYPE).reshape(count, *self.shape[1:])

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            position = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"image {index} of {len(self)}")
            return self._read(position, 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._read(start, max(stop - start, 0))
            index = np.arange(start, stop, step)
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return np.stack([self[int(i)] for i in index]) if len(index) else \
            np.empty((0, *self.shape[1:]), dtype=DTYPE)

    def __array__(self, dtype=None, copy=None):
        whole = self._read(0, len(self))
        return whole if dtype is None else whole.astype(dtype)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __getstate__(self) -> dict:
        # A file descriptor does not travel to another process (a DataLoader worker): it reopens.
        return {"file": self.file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["file"])


class DiskImagesWriter:
    """Writes a .npy file of `count` images of `shape`, image by image, in any order."""

    def __init__(self, file: Path, *, count: int, shape: tuple[int, ...]) -> None:
        self.file, self.count, self.shape = Path(file), count, tuple(shape)
        self.item = int(np.prod(self.shape))
        with self.file.open("wb") as handle:
            np.lib.format.write_array_header_2_0(handle, {
                "descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False,
                "shape": (count, *self.shape)})
            self.offset = handle.tell()
            handle.truncate(self.offset + count * self.item)
        self._fd = os.open(self.file, os.O_WRONLY)

    def put(self, index: int, image: np.ndarray) -> None:
        if image.shape != self.shape or image.dtype != DTYPE:
            raise ValueError(f"image {index}: {image.dtype} {image.shape}, expected uint8 {self.shape}")
        os.pwrite(self._fd, np.ascontiguousarray(image).tobytes(), self.offset + index * self.item)

    def close(self) -> None:
        """Flush to disk; a full disk raises OSError here at the latest."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
