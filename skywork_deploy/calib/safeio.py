"""Capped reads of calibration files: gzip JSON Lines streamed line by line, zip members read in memory.

Nothing is ever extracted to disk. Every cap counts what decompression produces (decoded bytes, lines,
rendered items), never only the compressed size, so a decompression bomb (or a lying size in a zip header)
stops with a one-line error after at most the cap, and memory stays flat in the number of lines:
- a C4 shard: each line at most LINE_CAP bytes, at most FILE_TEXT_CAP decoded bytes and FILE_LINES_CAP lines;
- a zip: each member at most MEMBER_CAP decoded bytes, all members together ARCHIVE_TOTAL_CAP;
- C-Eval and Alpaca items: at most ITEMS_CAP items and RENDERED_CAP characters of rendered text per source.
The caps are 10x or more above the real files (a C4 shard: ~356K lines, ~800 MB; C-Eval: 13,948 questions in
~10 MB of CSV; alpaca_data_cleaned.json: 51,760 entries, 44 MB; the JSON file cap is 3x that).
"""
import gzip
import zipfile
import zlib
from pathlib import Path

from ..base.errors import DataFormatError

MiB = 1 << 20
LINE_CAP = 16 * MiB              # one JSON Lines record (a C4 document is a few KiB)
FILE_TEXT_CAP = 4096 * MiB       # decoded bytes of one C4 shard (streamed: costs time, not memory)
FILE_LINES_CAP = 4_000_000       # lines of one C4 shard (the scan keeps ~20 bytes per line)
MEMBER_CAP = 16 * MiB            # one zip member (a C-Eval CSV is at most a few hundred KiB)
ARCHIVE_TOTAL_CAP = 256 * MiB    # all members read from one archive
FILE_CAP = 128 * MiB             # a whole JSON file (alpaca_data_cleaned.json is ~44 MB)
ITEMS_CAP = 1_000_000            # C-Eval questions or Alpaca entries of one source
RENDERED_CAP = 512 * MiB         # characters of rendered item text of one source
GZIP_MAGIC = b"\x1f\x8b"


def _mib(n):
    return f"{n // MiB} MiB"


def iter_lines(path, progress=None, line_cap=LINE_CAP, text_cap=FILE_TEXT_CAP, lines_cap=FILE_LINES_CAP):
    """Yield (line_no, raw bytes) of a JSON Lines file, gzip-compressed or plain, streamed and capped.

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
        line_no, reported, decoded = 0, 0, 0
        while True:
            try:
                line = stream.readline(line_cap + 1)
            except (EOFError, OSError, zlib.error) as exc:
                raise DataFormatError(f"{path}: truncated or corrupt gzip data after line {line_no} "
                                      f"({exc}); re-download the file") from None
            if not line:
                return
            line_no += 1
            decoded += len(line)
            if len(line) > line_cap:
                raise DataFormatError(f"{path}: line {line_no} is longer than {line_cap} bytes "
                                      "(not a C4 JSON Lines shard, or a decompression bomb)")
            if decoded > text_cap or line_no > lines_cap:
                raise DataFormatError(f"{path}: decompresses to more than {_mib(text_cap)} or {lines_cap} lines "
                                      "(a C4 shard holds ~356K lines; a decompression bomb?); split the file")
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
            raise DataFormatError(f"{where}: decompresses to more than {_mib(limit)} (a decompression bomb?); "
                                  "refusing to read it")
        self.total_left -= len(data)
        return data


class ItemBudget:
    """Counts the items of one source and the characters of their rendered text against the caps."""

    def __init__(self, where, items_cap=None, text_cap=None):
        self.items_cap = ITEMS_CAP if items_cap is None else items_cap
        self.text_cap = RENDERED_CAP if text_cap is None else text_cap
        self.where, self.items_left, self.text_left = where, self.items_cap, self.text_cap

    def take(self, text, where=None):
        self.items_left -= 1
        self.text_left -= len(text)
        if self.items_left < 0 or self.text_left < 0:
            raise DataFormatError(f"{where or self.where}: more than {self.items_cap} items or "
                                  f"{self.text_cap} characters of text (far beyond the real dataset; a "
                                  "decompression bomb?); refusing to read further")
        return text
