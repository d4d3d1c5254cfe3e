"""Reading raw corpora and cleaning their documents (no tokenization here).

Inputs, by file name:
    .txt                 documents separated by blank lines
    .jsonl, .jsonl.gz    one JSON object per line; the text is in field `text_field`
    .parquet             the column `text_field`
Undecodable bytes are dropped and counted; bad records (a line that is not JSON or lacks the
text field, a null parquet value) are skipped and counted, and the first is reported.
"""

import ast
import glob
import gzip
import hashlib
import json
import os
import re
import sysconfig
import unicodedata

from hvd_llama.errors import UserError

# C0/C1 control characters except tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def expand(patterns):
    """Input paths and globs -> sorted unique files; a pattern that matches nothing is an error."""
    files = []
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not matched:
            raise UserError(f"--input {pattern}: matches no file")
        for path in matched:
            if not path.endswith((".txt", ".jsonl", ".jsonl.gz", ".parquet")):
                raise UserError(f"{path}: unsupported input (want .txt, .jsonl, .jsonl.gz, "
                                ".parquet)")
            if path not in files:
                files.append(path)
    return files


def read(path, text_field, stats):
    """Yield the raw documents of one input file, counting problems into `stats` (a Counter)."""
    if path.endswith(".parquet"):
        yield from _read_parquet(path, text_field, stats)
    elif path.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(path, text_field, stats)
    else:
        text = _decode(_read_bytes(path), stats)
        yield from (d for d in text.split("\n\n") if d.strip())


def clean(text):
    """Unicode NFC, control characters removed, surrounding whitespace stripped."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text)).strip()


def digest(text):
    """Identity of a cleaned document for exact deduplication."""
    return hashlib.sha1(text.encode()).hexdigest()


def builtin_documents():
    """Paragraphs of the standard library's docstrings: real English prose, shipped with every
    Python, no download and no third-party text committed. Read with `ast`, never imported
    (importing some stdlib modules has side effects)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "idlelib", "site-packages", "dist-packages", "lib2to3", "tkinter"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield from (p for p in doc.split("\n\n") if p.strip())


def _read_bytes(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from e


def _decode(raw, stats):
    """UTF-8 with undecodable bytes dropped and counted (valid UTF-8 re-encodes to itself, so
    the bytes lost are the difference in length)."""
    text = raw.decode("utf-8", errors="ignore")
    stats["bad_utf8_bytes"] += len(raw) - len(text.encode("utf-8"))
    return text


def _read_jsonl(path, text_field, stats):
    for lineno, line in enumerate(_decode(_read_bytes(path), stats).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            stats["bad_records"] += 1
            stats.setdefault("first_bad_record", f"{path}:{lineno}")
            continue
        yield text


def _read_parquet(path, text_field, stats):
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise UserError(f"{path}: no column '{text_field}' (has: "
                            f"{', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield text
                else:  # a null row
                    stats["bad_records"] += 1
                    stats.setdefault("first_bad_record", f"{path}: a null '{text_field}'")
    except OSError as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from e
