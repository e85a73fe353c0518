"""Seeded sampling of calibration windows; every random draw comes from one numpy Generator.

C4 (GPTQ-style windows, exact and bounded):
1. Scan: stream every shard once, validating each line. Every document gets a random key
   (`rng.random()`, in file order) and its UTF-8 length. A document can only hold `seqlen` tokens when it
   has at least `seqlen - 1` bytes (every token covers at least one byte of text), so shorter ones are never
   tokenized. The texts of the lowest-key candidates are kept in memory up to a byte budget.
2. Walk the candidates in key order (a uniform random permutation), tokenizing them in batches with the
   fast tokenizer, and accept each one with at least `seqlen` tokens until `nsamples` distinct documents are
   accepted. For each accepted document an offset is drawn from [0, n - seqlen] inclusive, so a document of
   exactly `seqlen` tokens gives offset 0. Candidates beyond the kept budget are re-read in further passes.
3. The walk ends when the candidates run out, so it always terminates. If fewer than `nsamples` long
   documents exist, the caller either stops with an error or (allow_packing) fills the remaining windows by
   packing the other documents, in key order, separated by EOS.

C-Eval and Alpaca: items are ordered by `rng.permutation`, tokenized in batches and packed one after another,
each followed by EOS, into `seqlen` windows. A window records its pieces as [item id, start, end), token
positions within the item's tokens followed by its EOS (position len(item) is the EOS).

Windows never depend on the batch sizes: only on the data, the tokenizer and the seed.
"""
import heapq
from array import array
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ..base.errors import DataFormatError, InputError
from .readers import iter_c4_texts
from .safeio import iter_lines

KEY_BLOCK = 4096               # keys drawn per rng call during the scan
TEXT_BUDGET = 256 << 20        # candidate texts kept in memory between passes
ENTRY_OVERHEAD = 160           # bytes a kept text costs beyond its own (str header, dict slot, heap entry)
BATCH_BYTES = 4 << 20          # text tokenized per batch (bounds the memory of the encodings)
PACK_BATCH = 256               # items tokenized per batch when packing


class Tokens:
    """Batch tokenization without special tokens: the fast (Rust) backend when there is one."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._batch = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
        self.texts = 0
        self.tokens = 0

    def encode(self, texts):
        """A list of token id sequences (objects with len(); `ids_of` gives the ids)."""
        if not texts:
            return []
        if self._batch is not None:
            encs = self._batch(list(texts), add_special_tokens=False)
        else:
            encs = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        self.texts += len(encs)
        self.tokens += sum(len(e) for e in encs)
        return encs


def ids_of(enc):
    return enc.ids if hasattr(enc, "ids") else list(enc)


class NotEnoughTokens(Exception):
    """Raised by `pack` when the items run out; carries how many windows were filled."""

    def __init__(self, filled, needed):
        super().__init__(f"{filled} of {needed} windows")
        self.filled, self.needed = filled, needed


def pack(units, nwin, seqlen, eos_id, out=None, row0=0):
    """Fill rows row0..row0+nwin of `out` (int64 [*, seqlen]) from (item_id, ids) units, each followed by EOS.

    Returns (provenance per window, items used). Raises NotEnoughTokens when the units run out.
    """
    if out is None:
        out = np.empty((nwin, seqlen), np.int64)
    prov = [[] for _ in range(nwin)]
    w, fill, used = 0, 0, 0
    for item_id, ids in units:
        if w == nwin:
            break
        unit = list(ids) + [eos_id]
        used += 1
        pos = 0
        while pos < len(unit) and w < nwin:
            take = min(len(unit) - pos, seqlen - fill)
            out[row0 + w, fill:fill + take] = unit[pos:pos + take]
            prov[w].append([item_id, pos, pos + take])
            pos, fill = pos + take, fill + take
            if fill == seqlen:
                w, fill = w + 1, 0
    if w < nwin:
        raise NotEnoughTokens(w, nwin)
    return prov, used


def token_units(tokens, texts, batch=PACK_BATCH):
    """Lazily tokenize an iterator of (item_id, text) in batches; yields (item_id, ids)."""
    texts = iter(texts)
    while True:
        chunk = list(itertools.islice(texts, batch))
        if not chunk:
            return
        for (item_id, _), enc in zip(chunk, tokens.encode([t for _, t in chunk])):
            yield item_id, ids_of(enc)


def sample_packed(items, tokens, nsamples, seqlen, eos_id, rng, what="items"):
    """Windows [nsamples, seqlen] packed from (item_id, text) items in a seeded random order."""
    order = rng.permutation(len(items))
    out = np.empty((nsamples, seqlen), np.int64)
    units = token_units(tokens, ((items[i][0], items[i][1]) for i in order))
    try:
        prov, used = pack(units, nsamples, seqlen, eos_id, out)
    except NotEnoughTokens as exc:
        raise InputError(f"the source has {len(items)} {what}, {tokens.tokens} tokens with separators "
                         f"fill only {exc.filled} of {nsamples} windows of {seqlen}: lower --nsamples or "
                         "--seqlen, or use a larger source") from None
    windows = [{"kind": "packed", "pieces": p} for p in prov]
    stats = {"items_read": len(items), "items_used": used, "tokens_tokenized": tokens.tokens,
             "texts_tokenized": tokens.texts,
             "mean_item_tokens": round(tokens.tokens / max(tokens.texts, 1), 2)}
    return out, windows, stats


# ------------------------------------------------------------------------------------------------ C4
@dataclass
class C4Corpus:
    """What the scan learned about every document, and the texts kept in memory."""

    files: list                        # [(name, Path)]
    # compact arrays, ~20 bytes a document (Python lists of numbers cost ~117 bytes a line)
    file_of: array = field(default_factory=lambda: array("I"))
    line_of: array = field(default_factory=lambda: array("I"))
    nbytes: array = field(default_factory=lambda: array("I"))
    keys: array = field(default_factory=lambda: array("d"))
    cache: dict = field(default_factory=dict)
    passes: int = 1
    budget: int = TEXT_BUDGET          # bytes of text held in memory at once

    def doc_name(self, idx):
        return f"{self.files[self.file_of[idx]][0]}:{self.line_of[idx]}"

    def iter_texts(self, order):
        """Yield (idx, text) for `order`, from the cache or by re-reading the shards (budgeted passes)."""
        pos = 0
        while pos < len(order):
            idx = int(order[pos])
            text = self.cache.get(idx)
            if text is None:
                self._refill(order, pos)
                continue
            yield idx, text
            pos += 1

    def _refill(self, order, pos):
        want, total, j = {}, 0, pos
        while j < len(order) and (not want or total + self.nbytes[order[j]] + ENTRY_OVERHEAD <= self.budget):
            idx = int(order[j])
            want.setdefault(self.file_of[idx], {})[self.line_of[idx]] = idx
            total += self.nbytes[idx] + ENTRY_OVERHEAD
            j += 1
        self.cache = {}
        self.passes += 1
        for fi, lines in sorted(want.items()):
            name, path = self.files[fi]
            for line_no, raw in iter_lines(path):
                idx = lines.get(line_no)
                if idx is not None:
                    self.cache[idx] = _decode_text(raw, path, line_no)
        if int(order[pos]) not in self.cache:
            raise DataFormatError(f"{self.files[self.file_of[int(order[pos])]][1]}: changed while it was being "
                                  "read (line missing on the second pass); do not modify shards during calib")


def _decode_text(raw, path, line_no):
    # The first pass validated this line; a failure here means the file changed in between.
    import json

    try:
        return json.loads(raw.decode("utf-8"))["text"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise DataFormatError(f"{path}: line {line_no} changed while it was being read; do not modify shards "
                              "during calib") from None


def scan_c4(files, seqlen, rng, budget=TEXT_BUDGET, progress=None):
    """Pass 1 over every shard: keys, byte lengths, and the lowest-key candidate texts within `budget`."""
    corpus = C4Corpus(files=files, budget=budget)
    heap, kept_bytes, cutoff = [], 0, math.inf
    block, pos = np.empty(0), 0
    for fi, (name, path) in enumerate(files):
        for line_no, text in iter_c4_texts(name, path, progress):
            if pos == len(block):
                block, pos = rng.random(KEY_BLOCK), 0
            key = float(block[pos])
            pos += 1
            nb = len(text) if text.isascii() else len(text.encode("utf-8"))
            idx = len(corpus.keys)
            corpus.file_of.append(fi)
            corpus.line_of.append(line_no)
            corpus.nbytes.append(nb)
            corpus.keys.append(key)
            if nb + 1 >= seqlen and key < cutoff:
                heapq.heappush(heap, (-key, idx))
                corpus.cache[idx] = text
                kept_bytes += nb + ENTRY_OVERHEAD
                while kept_bytes > budget:
                    negkey, j = heapq.heappop(heap)
                    cutoff = -negkey
                    kept_bytes -= corpus.nbytes[j] + ENTRY_OVERHEAD
                    del corpus.cache[j]
    if not corpus.keys:
        raise DataFormatError(f"{files[0][1]}: no documents (empty shard)" if len(files) == 1
                              else "the C4 sources hold no documents (empty shards)")
    return corpus


def sample_c4(corpus, tokens, nsamples, seqlen, eos_id, rng, allow_packing=False):
    """GPTQ-style windows from distinct long documents; see the module docstring."""
    keys = np.asarray(corpus.keys)
    nbytes = np.asarray(corpus.nbytes)
    cand = np.flatnonzero(nbytes + 1 >= seqlen)
    order = cand[np.argsort(keys[cand], kind="stable")]
    out = np.empty((nsamples, seqlen), np.int64)
    windows, accepted, examined, long_found = [], set(), 0, 0
    texts = corpus.iter_texts(order)
    while len(windows) < nsamples:
        need = nsamples - len(windows)
        rate = (long_found + 1) / (examined + 2)
        size = int(min(max(math.ceil(need / rate * 1.2), 64), 4096))
        batch, nb = [], 0
        for idx, text in texts:
            batch.append((idx, text))
            nb += corpus.nbytes[idx]
            if len(batch) >= size or nb >= BATCH_BYTES:
                break
        if not batch:
            break
        for (idx, _), enc in zip(batch, tokens.encode([t for _, t in batch])):
            examined += 1
            n = len(enc)
            if n > corpus.nbytes[idx] + 1:
                raise InputError(f"the tokenizer made {n} tokens from {corpus.nbytes[idx]} bytes "
                                 f"({corpus.doc_name(idx)}); its tokens must cover at least one byte each")
            if n < seqlen:
                continue
            long_found += 1
            offset = int(rng.integers(0, n - seqlen + 1))   # inclusive of n - seqlen: exact-length docs work
            out[len(windows)] = ids_of(enc)[offset:offset + seqlen]
            windows.append({"kind": "window", "file": corpus.files[corpus.file_of[idx]][0],
                            "line": corpus.line_of[idx], "document": idx, "tokens": n, "offset": offset})
            accepted.add(idx)
            if len(windows) == nsamples:
                break
    stats = {"documents_read": len(keys), "documents_candidate": int(len(cand)),
             "documents_examined": examined, "long_documents_found": long_found,
             "windows_from_long_documents": len(windows), "documents_used": len(windows),
             "mean_document_bytes": round(float(nbytes.mean()), 2)}
    missing = nsamples - len(windows)
    if missing:
        if not allow_packing:
            raise InputError(f"only {long_found} of {len(keys)} C4 documents have at least {seqlen} tokens, "
                             f"{nsamples} windows needed: lower --seqlen or --nsamples, add shards, or pass "
                             "--allow-packing to fill the rest with packed shorter documents")
        rest = np.flatnonzero(~np.isin(np.arange(len(keys)), list(accepted)))
        rest = rest[np.argsort(keys[rest], kind="stable")]
        units = token_units(tokens, ((corpus.doc_name(i), t) for i, t in corpus.iter_texts(rest)))
        row0 = len(windows)
        try:
            prov, used = pack(units, missing, seqlen, eos_id, out, row0)
        except NotEnoughTokens as exc:
            raise InputError(f"the C4 sources hold too little text: {len(windows) + exc.filled} of {nsamples} "
                             f"windows of {seqlen} tokens even with packing; lower --nsamples or --seqlen, or "
                             "add shards") from None
        windows.extend({"kind": "packed", "pieces": p} for p in prov)
        stats.update(windows_packed=missing, documents_used=len(accepted) + used)
    stats.update(tokens_tokenized=tokens.tokens, texts_tokenized=tokens.texts,
                 mean_tokens_tokenized=round(tokens.tokens / max(tokens.texts, 1), 2), passes=corpus.passes)
    return out, windows, stats
