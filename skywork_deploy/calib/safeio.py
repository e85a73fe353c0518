"""Capped reads of calibration files: gzip JSON Lines streamed line by line, zip members read in memory.

Nothing is ever extracted to disk. Every read takes a byte limit and stops one byte past it, so a
compressed bomb (or a lying size in a zip header) costs at most that limit in memory.
"""
import gzip
import zipfile
import zlib
from pathlib import Path

from ..errors import DataFormatError

MiB = 1 << 20
LINE_CAP = 64 * MiB            # one JSON Lines record (a C4 document is a few KiB)
MEMBER_CAP = 512 * MiB         # one zip member (a C-Eval CSV is at most a few hundred KiB)
ARCHIVE_TOTAL_CAP = 2048 * MiB  # all members read from one archive
FILE_CAP = 1024 * MiB          # a whole JSON file (alpaca_data_cleaned.json is ~44 MB)
GZIP_MAGIC = b"\x1f\x8b"


def _mib(n):
    return f"{n // MiB} MiB"


def iter_lines(path, progress=None, line_cap=LINE_CAP):
    """Yield (line_no, raw bytes) of a JSON Lines file, gzip-compressed or plain, streamed.

    `progress(n_bytes)` is called now and then with the (compressed) bytes consumed since the last call.
    """
    path = Path(path)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot open ({exc.strerror})") from None
    with raw:
        magic = raw.read(2)
        raw.seek(0)
        if magic == GZIP_MAGIC:
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif path.name.endswith(".gz"):
            raise DataFormatError(f"{path}: not a gzip file (a C4 shard .json.gz starts with the gzip magic bytes; "
                                  "re-download it)")
        else:
            stream = raw
        line_no, reported = 0, 0
        while True:
            try:
                line = stream.readline(line_cap + 1)
            except (EOFError, OSError, zlib.error) as exc:
                raise DataFormatError(f"{path}: truncated or corrupt gzip data after line {line_no} "
                                      f"({exc}); re-download the file") from None
            if not line:
                return
            line_no += 1
            if len(line) > line_cap:
                raise DataFormatError(f"{path}: line {line_no} is longer than {line_cap} bytes "
                                      "(not a C4 JSON Lines shard, or a decompression bomb)")
            if progress is not None and line_no % 2048 == 0:
                progress(raw.tell() - reported)
                reported = raw.tell()
            yield line_no, line


def read_file_capped(path, cap=FILE_CAP):
    """The bytes of a regular file, refusing files larger than `cap`."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(cap + 1)
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > cap:
        raise DataFormatError(f"{path}: larger than {_mib(cap)}; refusing to read it")
    return data


def open_zip(path):
    """A ZipFile on `path`, with a one-line error for truncated or non-zip files."""
    path = Path(path)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DataFormatError(f"{path}: not a valid zip archive ({exc}); the download may be truncated, "
                              "re-download it") from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot open ({exc.strerror})") from None


class ZipBudget:
    """Reads members of one open archive in memory, each capped, and all of them together capped."""

    def __init__(self, zf, path, member_cap=MEMBER_CAP, total_cap=ARCHIVE_TOTAL_CAP):
        self.zf, self.path = zf, Path(path)
        self.member_cap, self.total_left = member_cap, total_cap

    def read(self, info):
        where = f"{self.path}:{info.filename}"
        if info.file_size > self.member_cap:
            raise DataFormatError(f"{where}: member is {info.file_size} bytes uncompressed, more than "
                                  f"{_mib(self.member_cap)}; refusing to read it")
        limit = min(self.member_cap, self.total_left)
        try:
            with self.zf.open(info) as fh:
                data = fh.read(limit + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
            raise DataFormatError(f"{where}: corrupt or truncated member ({exc}); re-download the archive") from None
        if len(data) > limit:
            raise DataFormatError(f"{where}: decompresses to more than {_mib(limit)}; refusing to read it")
        self.total_left -= len(data)
        return data
