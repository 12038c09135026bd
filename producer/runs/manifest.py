"""Manifests: the rows of a run, read from a file or expanded from a grid, every one validated
before anything is written.

Formats, by suffix: JSONL (.jsonl, .ndjson), CSV (.csv), Parquet (.parquet), and TOML (.toml) for a
grid, the cartesian product of a few lists of values. A row may give any request field, plus `key`
(its stable key within the run) and `priority` ("interactive" or "bulk"); its `image` (and
`mask`, `depth_map`) is the path of a file, relative to the manifest's folder. A bad row never raises: it becomes a Rejected, with
one line per problem, beside the good rows, and the caller decides what to do.

Keys are stable, so that enqueueing the same manifest again finds the rows it already made: a
row's own `key`, else one derived from its validated request (see `_Rows._derived_key`).

Memory stays flat in a manifest's length: a file is read in passes, never whole. The first pass
validates every row and keeps only counts, the first bad rows and the keys seen (on disk past
SPILL_KEYS); `Manifest.rows` reads the file again, row by row, for the writer, and refuses a file
that changed in between. Every read is bounded (MAX_MANIFEST_BYTES, MAX_LINE_BYTES, MAX_GRID_BYTES,
MAX_PROMPTS_FILE_BYTES, MAX_RUN_ROWS, MAX_DEPTH), and nothing is written before the first pass ends.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import pickle
import sqlite3
import tempfile
import tomllib
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from models.errors import BadInput, InvalidRequest, SdqueueError
from models.registry import model_key
from models.request import (After, GenerationRequest, check_depth_map, check_image, check_inputs, follow_up,
                            parse_request)
from models.tables import Priority
from models.text import refused_character
from producer.files import UnreadableFile, bound_text, open_regular, read_bounded, read_image_file, stream_bounded

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUFFIXES = (*JSONL_SUFFIXES, ".csv", ".parquet", ".toml")
MAX_KEY_CHARS = 255
# The keys of a row's follow-ups (`then`): the row's key and this.
THEN_KEY = ">then{index}"
# The bounds of what is read from a user, stated in the README.
MAX_RUN_ROWS = 1_000_000  # rows of a manifest or grid, good and bad
MAX_GRID_ROWS = MAX_RUN_ROWS
MAX_MANIFEST_BYTES = 4 << 30  # a JSONL, CSV or Parquet file
MAX_LINE_BYTES = 1 << 20  # a JSONL or CSV line: a prompt is at most 4,000 characters
MAX_GRID_BYTES = 1 << 20  # a TOML grid file
MAX_PROMPTS_FILE_BYTES = 64 << 20  # a grid's prompts_file
MAX_DEPTH = 16  # tables and arrays in tables and arrays, in TOML (a grid needs 2)
# Bad rows format_rejects shows before it only counts the rest, and the most a Manifest keeps.
SHOWN_REJECTS = 50
KEPT_REJECTS = 100
# Keys held in memory before the rest go to a temporary file.
SPILL_KEYS = 200_000
# Input image files whose bytes are kept for the rows that repeat them.
CACHED_IMAGES = 8
# The request fields a row gives as files: their paths, relative to the manifest's folder.
FILE_FIELDS = ("image", "mask", "depth_map")
PRIORITIES = tuple(p.value for p in Priority)

# CSV cells are text: each typed request field's converter, and what a cell that fails it is not.
# Every other field stays text. A bool is spelled as people write them in spreadsheets.
_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _bool(text: str) -> bool:
    return _BOOLS[text.strip().lower()]


CSV_TYPES: dict[str, tuple[Callable[[str], Any], str]] = {
    "num_images": (int, "not a whole number"),
    "num_inference_steps": (int, "not a whole number"),
    "width": (int, "not a whole number"),
    "height": (int, "not a whole number"),
    "seed": (int, "not a whole number"),
    "guidance_scale": (float, "not a number"),
    "strength": (float, "not a number"),
    "noise_level": (int, "not a whole number"),
    "use_compel": (_bool, "not one of true, false, 1, 0, yes, no"),
}

# Grid axes, outermost first, and the request fields each one sets.
GRID_AXES: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt",),
    "negative_prompts": ("negative_prompt",),
    "sizes": ("width", "height"),
    "guidance_scales": ("guidance_scale",),
    "steps": ("num_inference_steps",),
    "num_images": ("num_images",),  # a list is the axis; one number is the plain request field
    "seeds": ("seed",),
}
GRID_KEYS = (*GRID_AXES, "prompts_file", *(f for f in GenerationRequest.model_fields if f not in GRID_AXES))

_PLACEHOLDER = re.compile(r"\{(schedule|fire_time|date|time|year|month|day|hour|minute)\}")
_PLACEHOLDER_FORMATS = {"date": "%Y-%m-%d", "time": "%H:%M", "year": "%Y", "month": "%m", "day": "%d",
                        "hour": "%H", "minute": "%M"}
_SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


class ManifestError(BadInput):
    """A manifest or grid that cannot be read at all: unreadable, of an unknown format, or a bad
    grid spec. (A bad row is not one: it is a Rejected.) Nothing was written or enqueued."""


class SpoolFailed(SdqueueError):
    """The temporary folder's disk refused the validated rows (full, read-only): the host's
    fault, not the manifest's (exit 1, not 2). Nothing was written."""


@dataclass(frozen=True)
class RunRow:
    line: int  # JSONL and CSV: the line in the file; Parquet: the row's index; grid: its index in the expansion (1-based)
    key: str  # stable key of the row within its run
    request: GenerationRequest  # validated; for img2img rows .image holds the bytes
    priority: str | None  # the row's own `priority` column, else None
    image_path: str | None = None  # the file its image was read from (None: no image, or the defaults')
    mask_path: str | None = None  # the file its inpainting mask was read from (likewise)
    depth_map_path: str | None = None  # the file its depth map was read from (likewise)
    # `then`: one follow-up of each of its images (its `after` filled in as the row's job is written)
    then: GenerationRequest | None = None


@dataclass(frozen=True)
class Rejected:
    line: int
    problems: list[str]  # one line per problem, naming the field, the value and the bound
    row: dict[str, Any]  # the raw row as read, JSON-serialisable: an image is its path, never its bytes


class Manifest:
    """A validated manifest: how many good rows, the first bad ones, and its good rows read back
    on demand (`for row in manifest.rows`), so that no pass holds the whole file."""

    def __init__(self, source: str | None, scan: Callable[[], Iterator[RunRow | Rejected]],
                 sha256: Callable[[], str | None], images: Callable[[], _Rows]):
        self.source = source  # the file path as given (None for an inline grid)
        self._scan = scan
        self._images = images  # what finds a row's input image again
        self.rejects: list[Rejected] = []  # the first KEPT_REJECTS bad rows
        self.reject_count = 0
        count = 0
        # 1. the first pass: every row validated; kept, the counts, the first bad rows, and the
        #    good rows' validated values in a temporary file
        self._spool = _Spool(source or "grid")
        try:
            for item in scan():
                if isinstance(item, RunRow):
                    count += 1
                    self._spool.add(item)
                else:
                    self.reject_count += 1
                    if len(self.rejects) < KEPT_REJECTS:
                        self.rejects.append(item)
                if count + self.reject_count > MAX_RUN_ROWS:
                    raise ManifestError(f"{source or 'grid'}: more than {MAX_RUN_ROWS:,} rows, the bound of a run")
        finally:
            self._spool.close()
        self.sha256 = sha256()  # sha256 hex of the file's bytes (of the spec for an inline grid)
        self.rows = _Pass(self, count)

    def _read_back(self) -> Iterator[RunRow]:
        """The good rows as the first pass validated them, their input images read again (and
        refused if they changed since)."""
        images = self._images()
        try:
            for line, key, priority, params, then, *files in self._spool:
                paths, digests = files[0::2], files[1::2]  # FILE_FIELDS' paths and sha256s, in turn
                data = {name: images.image_again(path, sha256, name) if sha256 is not None else None
                        for name, path, sha256 in zip(FILE_FIELDS, paths, digests)}
                request = GenerationRequest.model_construct(**params, **data)  # validated in the first pass
                follow = None
                if then is not None:
                    follow = GenerationRequest.model_construct(**{**then, "after": After.model_construct(**then["after"])})
                yield RunRow(line, key, request, priority, *paths, then=follow)
        finally:
            images.close()

    def all_rejects(self) -> Iterator[Rejected]:
        """Every bad row, read again where there are more than were kept."""
        if self.reject_count <= len(self.rejects):
            yield from self.rejects
            return
        for item in self._scan():
            if isinstance(item, Rejected):
                yield item


class _Pass:
    """A manifest's good rows: len() is known from the first pass; each iteration reads again."""

    def __init__(self, manifest: Manifest, count: int):
        self._manifest = manifest
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[RunRow]:
        return self._manifest._read_back()


class _Spool:
    """The first pass's good rows, pickled one after the other to a temporary file: the writer
    reads them back rather than validating the file again, so that memory stays flat and the
    second pass costs a read. The file is unlinked as soon as it is made (only its descriptor
    holds it), so it is gone with the Manifest, or with the process however it ends."""

    def __init__(self, source: str):
        self.source = source
        try:
            fd, path = tempfile.mkstemp(prefix="sdqueue-rows-")
            os.unlink(path)
        except OSError as exc:
            raise SpoolFailed(f"{source}: no temporary file for its rows ({exc.strerror or exc})") from None
        self.fd = fd
        self._close = weakref.finalize(self, os.close, fd)
        self._file: Any = os.fdopen(os.dup(fd), "wb")

    def add(self, row: RunRow) -> None:
        values: tuple[Any, ...] = (row.line, row.key, row.priority, row.request.parameters(),
                                   row.then.parameters() if row.then is not None else None)
        for path, data in ((row.image_path, row.request.image), (row.mask_path, row.request.mask),
                           (row.depth_map_path, row.request.depth_map)):  # FILE_FIELDS'
            values += (path, hashlib.sha256(data).hexdigest() if data is not None else None)
        try:
            pickle.dump(values, self._file, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError as exc:  # the temporary folder's disk is full
            raise SpoolFailed(f"{self.source}: its rows cannot be kept in a temporary file "
                                f"({exc.strerror or exc})") from None

    def close(self) -> None:
        """The end of the writing: what was written is read back from the start."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        try:  # an open file of its own, with its own offset: two passes may interleave
            file = open(f"/proc/self/fd/{self.fd}", "rb")
        except OSError:  # no /proc: one pass at a time
            file = os.fdopen(os.dup(self.fd), "rb")
            file.seek(0)
        with file:
            while True:
                try:
                    yield pickle.load(file)
                except EOFError:
                    return


def load_manifest(
    path: Path,
    defaults: dict[str, Any] | None = None,
    *,
    fire_time: datetime | None = None,
    schedule: str | None = None,
    files: bool = True,
    settings: Any = None,
) -> Manifest:
    """Read and validate every row of the manifest at `path`, by its suffix.

    `defaults` (request fields) fill the fields a row does not give; then the request schema's own
    defaults apply. `fire_time` and `schedule` fill a grid's placeholders. `files=False` for a
    manifest uploaded over HTTP: it may name no file on this host (a row's image, a prompts_file).
    `settings`: the deployment's, against which a row's model is checked (models/request.py).
    """
    base_dir = path.parent if files else None
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ManifestError(f"{path}: unknown manifest format {suffix or '(no suffix)'!r}: "
                            f"the formats are {', '.join(SUFFIXES)}")
    if suffix == ".toml":
        data = _read(path, MAX_GRID_BYTES)
        spec = parse_toml(path, data, ManifestError)
        return load_grid(spec, base_dir, defaults, fire_time=fire_time, schedule=schedule, source=str(path),
                         sha256=hashlib.sha256(data).hexdigest(), settings=settings)
    read = {".csv": _csv_rows, ".parquet": _parquet_rows}.get(suffix, _jsonl_rows)
    first: list[str] = []  # the first pass's sha256

    def scan() -> Iterator[RunRow | Rejected]:
        digest = hashlib.sha256()
        # JSON and CSV rows are JSON already; Parquet values may be bytes, times or decimals.
        rows = _Rows(base_dir, defaults, plain_rejects=suffix == ".parquet", settings=settings)
        try:
            yield from read(path, digest, rows)
        except UnreadableFile as exc:
            raise ManifestError(f"{path}: {exc}") from None
        finally:
            rows.close()
        if not first:
            first.append(digest.hexdigest())
        elif digest.hexdigest() != first[0]:
            raise ManifestError(f"{path}: the file changed while it was read: nothing after its first "
                                "pass can be trusted; run the command again")

    return Manifest(str(path), scan, lambda: first[0], lambda: _Rows(base_dir, defaults, settings=settings))


def load_grid(
    spec: dict[str, Any],
    base_dir: Path | None,
    defaults: dict[str, Any] | None = None,
    *,
    fire_time: datetime | None = None,
    schedule: str | None = None,
    source: str | None = None,
    sha256: str | None = None,
    settings: Any = None,
) -> Manifest:
    """Expand a grid (the keys of a TOML grid file) into validated rows, outermost axis first:
    prompts, negative_prompts, sizes, guidance_scales, steps, num_images, seeds.

    Any other request field is one value for every row. A relative `prompts_file` or `image` is
    found in `base_dir` (None: no file may be named, the grid came over HTTP).
    """
    where = source or "grid"
    # 1. the keys
    if not isinstance(spec, dict):
        raise ManifestError(f"{where}: a grid is a table of keys, not {type(spec).__name__}")
    check_depth(spec, where)
    for name in spec:
        if name not in GRID_KEYS:
            raise ManifestError(f"{where}: unknown key {_shown(name)}: the known keys are {', '.join(GRID_KEYS)}")
    spec = dict(spec)
    if "prompts" in spec and "prompts_file" in spec:
        raise ManifestError(f"{where}: give prompts or prompts_file, not both")
    if "prompts_file" in spec:
        spec["prompts"] = _prompts_file(spec.pop("prompts_file"), base_dir, fire_time, schedule, where)
    # 2. the axes, each a sequence of values (a range is never spelled out)
    fields: list[tuple[str, ...]] = []
    axes: list[Sequence[Any]] = []
    for axis, names in GRID_AXES.items():
        if axis not in spec or (axis == "num_images" and not isinstance(spec[axis], list)):
            continue  # not given; or num_images as one number: the request field, not the axis
        clash = [name for name in names if name in spec and name != axis]
        if clash:
            raise ManifestError(f"{where}: give {axis} or {clash[0]}, not both")
        values = spec.pop(axis)
        if axis == "seeds":
            values = _seeds(values, fire_time, where)
        elif not isinstance(values, list) or not values:
            raise ManifestError(f"{where}: {axis} must be a non-empty list of values, not {_shown(values)}")
        elif axis == "sizes":
            values = [_size(value, where, index) for index, value in enumerate(values)]
        elif axis in ("prompts", "negative_prompts"):
            values = [fill_placeholders(value, fire_time, schedule, where=f"{where}: {axis}[{index}]")
                      if isinstance(value, str) else value for index, value in enumerate(values)]
        fields.append(names)
        axes.append(values)
    # 3. the rest: one value of a request field for every row
    for name, value in spec.items():
        if isinstance(value, (list, dict)):
            raise ManifestError(f"{where}: {name} is one value for every row, not {_shown(value)} "
                                f"(the axes are {', '.join(GRID_AXES)})")
        if name in ("prompt", "negative_prompt") and isinstance(value, str):
            spec[name] = fill_placeholders(value, fire_time, schedule, where=f"{where}: {name}")
    # 4. the size, before a row is made
    size = math.prod(len(values) for values in axes)
    if size > MAX_GRID_ROWS:
        raise ManifestError(f"{where}: the grid has {size:,} rows, more than the bound of {MAX_GRID_ROWS:,}")

    # 5. the rows, made again on each pass (TOML has dates and times, which a reject's row holds as text)
    def scan() -> Iterator[RunRow | Rejected]:
        rows = _Rows(base_dir, defaults, plain_rejects=True, settings=settings)
        try:
            for line, combination in enumerate(itertools.product(*axes), start=1):
                row = dict(spec)
                for names, value in zip(fields, combination):
                    if len(names) == 1:
                        row[names[0]] = value
                    else:
                        row.update(zip(names, value))
                yield rows.check(line, row)
        finally:
            rows.close()

    return Manifest(source, scan, lambda: sha256, lambda: _Rows(base_dir, defaults, settings=settings))


def check_depth(value: Any, where: str, bound: int = MAX_DEPTH) -> None:
    """Refuse tables and arrays nested deeper than `bound` (without recursion: the value may be
    as deep as the parser let it be)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > bound:
                    raise ManifestError(f"{where}: tables and arrays nested deeper than the bound of {bound} levels")
                stack.append((child, depth + 1))


def parse_toml(path: Path, data: bytes, error: Callable[[str], Exception]) -> dict[str, Any]:
    """A TOML file's tables, nested at most MAX_DEPTH levels; `error` makes the refusal."""
    try:
        spec = tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not a TOML file ({exc})") from None
    except RecursionError:
        raise error(f"{path}: tables and arrays nested deeper than the bound of {MAX_DEPTH} levels") from None
    try:
        check_depth(spec, str(path))
    except ManifestError as exc:
        raise error(str(exc)) from None
    return spec


def format_rejects(rejects: list[Rejected], limit: int = SHOWN_REJECTS, total: int | None = None) -> str:
    """One line per problem ("line 7: width=500: must be ..."), of the first `limit` bad rows;
    `total`: how many there are, where `rejects` holds only the first."""
    lines = [f"line {reject.line}: {problem}" for reject in rejects[:limit] for problem in reject.problems]
    total = len(rejects) if total is None else total
    if total > limit:
        more = total - limit
        lines.append(f"... and {more} more bad row{'s' if more != 1 else ''}")
    return "\n".join(lines)


def write_rejects(rejects: Iterable[Rejected], out: Any) -> None:
    """Every bad row as one JSON object a line: {"line": N, "problems": [...], "row": {...}}, to
    the text file `out` (a path, or a file open for writing)."""
    if isinstance(out, (str, Path)):
        with open(out, "w", encoding="utf-8") as file:
            write_rejects(rejects, file)
        return
    for reject in rejects:
        out.write(json.dumps({"line": reject.line, "problems": reject.problems, "row": reject.row}) + "\n")


def fill_placeholders(text: str, fire_time: datetime | None, schedule: str | None, *, where: str) -> str:
    """`text` with {schedule}, {fire_time} (ISO 8601), {date} (YYYY-MM-DD), {time} (HH:MM), {year},
    {month}, {day}, {hour} and {minute} (two digits) filled in, from fire_time in its own time
    zone. Other braces are left alone. `where` names the text in a refusal."""
    if "{" not in text:
        return text

    def value(match: re.Match[str]) -> str:
        name = match[1]
        if fire_time is None or (name == "schedule" and schedule is None):
            raise ManifestError(f"{where} uses {{{name}}}: placeholders are filled only when a schedule fires")
        if name == "schedule":
            return str(schedule)
        if name == "fire_time":
            return fire_time.isoformat()
        return fire_time.strftime(_PLACEHOLDER_FORMATS[name])

    return _PLACEHOLDER.sub(value, text)


class _Rows:
    """One pass's rows, validated one by one into good rows (with their keys) and rejects."""

    def __init__(self, base_dir: Path | None, defaults: dict[str, Any] | None, *, plain_rejects: bool = False,
                 settings: Any = None):
        self.base_dir = base_dir  # None: the rows may name no file (an upload)
        self.settings = settings  # the deployment's: what a row's model is checked against
        self.defaults = dict(defaults or {})
        self.plain_rejects = plain_rejects  # whether a rejected row needs _plain to be JSON
        self._keys = _KeyBook()  # every key given or derived so far, its first line; derived keys by digest
        # By path (and whether as a depth map), each file read and checked once while its rows keep
        # coming (a few files at a time).
        self._images: OrderedDict[tuple[bool, str], bytes | InvalidRequest] = OrderedDict()
        # Bytes checked: their sha256, size, and whether checked as a depth map too.
        self._checked: OrderedDict[bytes, tuple[str, tuple[int, int], bool]] = OrderedDict()

    def close(self) -> None:
        self._keys.close()

    def reject(self, line: int, problems: list[str], row: dict[str, Any]) -> Rejected:
        return Rejected(line, problems, _plain(row) if self.plain_rejects else row)

    def check(self, line: int, row: dict[str, Any], given: dict[str, Any] | None = None,
              problems: list[str] | None = None) -> RunRow | Rejected:
        """Validate one row: `row` as read, `given` its values in Python types (if not the same),
        `problems` those found converting them."""
        values = dict(row if given is None else given)
        problems = problems or []
        # 1. the columns that are not request fields
        key = values.pop("key", None)
        if key is not None:
            key = self._explicit_key(key, line, problems)
        priority = values.pop("priority", None)
        if priority is not None and priority not in PRIORITIES:
            problems.append(f"priority={_shown(priority)}: must be one of {', '.join(PRIORITIES)}")
        then = values.pop("then", None)
        if "after" in values:
            problems.append("after: a run's row follows no other job; `then` makes a follow-up of each of its images")
        # 2. the input image, the inpainting mask and the depth map: the row's paths, else bytes
        #    from the defaults
        named = {name: values.pop(name, None) for name in FILE_FIELDS}
        if self.defaults:
            values = {**self.defaults, **values}
            for name in FILE_FIELDS:
                default = values.pop(name, None)
                named[name] = default if named[name] is None else named[name]
        files: dict[str, bytes] = {}
        for name, given in named.items():
            if given is not None:
                try:
                    files[name] = self._image(given, name)
                except InvalidRequest as exc:
                    problems.extend(exc.problems)
        # 3. the request
        try:
            request = parse_request(values, self.settings, inputs_later=True)
        except InvalidRequest as exc:
            problems.extend(exc.problems)
        if not problems:
            # The bytes passed check_image, the field's own validator, once per file: a thousand
            # rows of one input image decode it once, not a thousand times.
            request = request.model_copy(update=files)
            try:
                request = check_inputs(request, {name: self._size(data) for name, data in files.items()},
                                       pixel_budget=self.settings.pixel_budget if self.settings is not None else 0)
            except ValueError as exc:
                problems.append(str(exc))
        follow = None
        if then is not None and not problems:
            follow = self._then(then, request, problems)
        if key is not None and follow is not None and len(key) > MAX_KEY_CHARS - len(THEN_KEY.format(index=0)):
            problems.append(f"key={_shown(key)}: a row with `then` has a key of at most "
                            f"{MAX_KEY_CHARS - len(THEN_KEY.format(index=0))} characters (its follow-ups' keys add "
                            f"{THEN_KEY.format(index=0)!r})")
        if problems:
            return self.reject(line, problems, row)
        # 4. the key
        if key is None:
            key = self._derived_key(request, named_model="model" in values, then=follow)
            first = self._keys.first_line(key, line)
            if first != line:
                return self.reject(line, [f"derived key {key!r} repeats the key of line {first}"], row)
        paths = (str(self.base_dir / given) if isinstance(given, str) and self.base_dir is not None else None
                 for given in named.values())
        return RunRow(line, key, request, priority, *paths, then=follow)

    def _then(self, then: Any, request: GenerationRequest, problems: list[str]) -> GenerationRequest | None:
        """A row's `then`: the request fields of one follow-up of each of its images (an object; in
        CSV, JSON text), its prompts the row's unless given; checked against the row's image size."""
        if isinstance(then, str):
            try:
                then = json.loads(then)
            except ValueError:
                pass
        if not isinstance(then, dict):
            problems.append(f"then={_shown(then)}: must be an object of request fields, e.g. "
                            '{"model": "sd21-upscaler", "noise_level": 20}')
            return None
        refused = [name for name in ("image", "mask", "depth_map", "after", "then") if name in then]
        if refused:
            problems.append(f"then.{refused[0]}: a follow-up's input is the row's image; it takes no "
                            f"{refused[0]} (inpainting follow-ups: `sdqueue submit --after`)")
            return None
        data = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, **then,
                "after": {"job": "-", "index": 0}}  # its job is known once the row's is written
        try:
            follow = parse_request(data, self.settings, inputs_later=True)
            model = follow.model or (model_key(self.settings.default_model) if self.settings is not None else None)
            if model is None:
                raise InvalidRequest(["model: needs the deployment's default model (run with settings)"])
            return follow_up(follow, (request.width, request.height), model,
                             self.settings.pixel_budget if self.settings is not None else 0)
        except InvalidRequest as exc:
            problems.extend(f"then.{problem}" for problem in exc.problems)
        except ValueError as exc:
            problems.append(f"then: {exc}")
        return None

    def _explicit_key(self, key: Any, line: int, problems: list[str]) -> str | None:
        if isinstance(key, bool) or not isinstance(key, (str, int)) or not 1 <= len(str(key)) <= MAX_KEY_CHARS:
            problems.append(f"key={_shown(key)}: must be text or a whole number, of 1 to {MAX_KEY_CHARS} characters")
            return None
        key = str(key)
        bad = refused_character(key, allow_newlines=False)
        if bad is not None:  # PostgreSQL cannot hold NUL; a key is shown on one line
            problems.append(f"key={_shown(key)}: must not hold control characters: {bad}")
            return None
        first = self._keys.first_line(key, line)
        if first != line:
            problems.append(f"key {_shown(key)} repeats line {first}")
        return key

    def _derived_key(self, request: GenerationRequest, *, named_model: bool,
                     then: GenerationRequest | None = None) -> str:
        """The sha256 of the request's parameters (and its image's sha256), cut to 24 hex digits,
        then how many earlier rows had the same: a duplicated row is two jobs, and rows added
        elsewhere leave the others' keys alone. The model counts only where the row (or the
        defaults) named it: a row that names none keeps its key whatever the deployment's default
        (and the keys of runs made before requests named models)."""
        parameters = request.parameters()
        if not named_model:
            parameters.pop("model")
        text = _KEY_JSON.encode(parameters)
        if request.image is not None:
            text += "|" + self._check(request.image)
        if request.mask is not None:
            text += "|mask " + self._check(request.mask, "mask")
        if request.depth_map is not None:
            text += "|depth_map " + self._check(request.depth_map, "depth_map")
        if then is not None:
            text += "|then " + _KEY_JSON.encode(then.parameters())
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        return f"{digest}-{self._keys.next_count(digest)}"

    def image_again(self, path: str | None, sha256: str, name: str = "image") -> bytes:
        """A row's input image (or mask, or depth map) for the writer: read again from `path` (None: the
        defaults'), refused if it is not the one the first pass checked."""
        data = self.defaults[name] if path is None else self._file_image(Path(path), name)
        if self._check(data) != sha256:
            raise ManifestError(f"{name}={path!r}: the file changed while the manifest was enqueued: run the "
                                "command again")
        return data

    def _image(self, image: Any, name: str = "image") -> bytes:
        """The bytes of a row's image (or mask, or depth map) file (a path relative to the manifest's
        folder), checked."""
        if isinstance(image, bytes):  # from the defaults
            self._check(image, name)
            return image
        if not isinstance(image, str) or not image:
            raise InvalidRequest([f"{name}={_shown(image)}: must be the path of an image file, "
                                  "relative to the manifest's folder"])
        if self.base_dir is None:  # an upload must not read this host's files
            raise InvalidRequest([f"{name}={_shown(image)}: an uploaded manifest cannot name files: its rows are "
                                  "text-to-image (submit img2img, inpainting and depth jobs to POST /v1/jobs)"])
        return self._file_image(self.base_dir / image, name)

    def _file_image(self, path: Path, name: str = "image") -> bytes:
        # Kept by path and by the check it passed: a depth map's goes further than an image's
        # (a file of one value is a fine image, and no depth map).
        kept = (name == "depth_map", str(path))
        found = _cached(self._images, kept)
        if found is None:
            try:
                found = read_image_file(path, field=name)
                self._check(found, where=f"{name}={str(path)!r}")
            except InvalidRequest as exc:
                found = exc
            _keep(self._images, kept, found)
        if isinstance(found, InvalidRequest):
            raise found
        return found

    def _check(self, data: bytes, where: str | None = None) -> str:
        """check_image once per distinct bytes (of the last few), check_depth_map where `where`
        names a depth map (a field, or a field=path); their sha256 (and their size, in _sizes,
        while they are among the last few)."""
        found = _cached(self._checked, data)
        depth_map = where is not None and where.partition("=")[0] == "depth_map"
        if found is None or (depth_map and not found[2]):
            name = where if where in FILE_FIELDS else "image"
            try:
                size = check_depth_map(data) if depth_map else check_image(data)
            except ValueError as exc:
                shown = where if where not in (None, *FILE_FIELDS) else f"{name}=<{len(data)} bytes>"
                raise InvalidRequest([f"{shown}: {exc}"]) from None
            found = (hashlib.sha256(data).hexdigest(), size, depth_map)
            _keep(self._checked, data, found)
        return found[0]

    def _size(self, data: bytes) -> tuple[int, int]:
        """The size of checked bytes (checked again if they left the cache)."""
        self._check(data)
        return self._checked[data][1]


def _cached(cache: OrderedDict[Any, Any], key: Any) -> Any:
    found = cache.get(key)
    if found is not None:
        cache.move_to_end(key)
    return found


def _keep(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    if len(cache) > CACHED_IMAGES:
        cache.popitem(last=False)


class _KeyBook:
    """The keys of one pass with the line each first appeared on, and how many rows had each
    derived key's digest: in dicts, then past SPILL_KEYS in a private temporary SQLite file
    (deleted when closed), so that a million rows cost no more memory than two hundred thousand."""

    def __init__(self, spill: int | None = None):
        self._spill = SPILL_KEYS if spill is None else spill
        self._lines: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._db: sqlite3.Connection | None = None

    def first_line(self, key: str, line: int) -> int:
        """The line `key` first appeared on: `line`, the first time."""
        if self._db is None:
            first = self._lines.setdefault(key, line)
            self._maybe_spill()
            return first
        if self._db.execute("INSERT OR IGNORE INTO keys VALUES (?, ?)", (key, line)).rowcount:
            return line  # the usual case, in one statement
        return int(self._db.execute("SELECT line FROM keys WHERE key = ?", (key,)).fetchone()[0])

    def next_count(self, digest: str) -> int:
        """How many rows had `digest` before this one."""
        if self._db is None:
            n = self._counts.get(digest, 0)
            self._counts[digest] = n + 1
            self._maybe_spill()
            return n
        if self._db.execute("INSERT OR IGNORE INTO counts VALUES (?, 1)", (digest,)).rowcount:
            return 0  # the usual case, in one statement
        n = int(self._db.execute("SELECT n FROM counts WHERE digest = ?", (digest,)).fetchone()[0])
        self._db.execute("UPDATE counts SET n = ? WHERE digest = ?", (n + 1, digest))
        return n

    def _maybe_spill(self) -> None:
        if len(self._lines) + len(self._counts) <= self._spill:
            return
        db = sqlite3.connect("", isolation_level=None)  # "": a private temporary database on disk
        db.execute("PRAGMA journal_mode = OFF")  # it lives as long as this pass; nothing to recover
        db.execute("PRAGMA cache_size = -16384")  # 16 MiB of pages in memory, the rest on disk
        db.execute("BEGIN")  # one transaction, never committed: the file goes when the pass ends
        db.execute("CREATE TABLE keys (key TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")
        db.execute("CREATE TABLE counts (digest TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID")
        db.executemany("INSERT INTO keys VALUES (?, ?)", self._lines.items())
        db.executemany("INSERT INTO counts VALUES (?, ?)", self._counts.items())
        self._lines, self._counts, self._db = {}, {}, db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _read(path: Path, bound: int) -> bytes:
    try:
        return read_bounded(path, bound)
    except UnreadableFile as exc:
        raise ManifestError(f"{path}: {exc}") from None


def _lines(path: Path, digest: Any) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, byte offset, bytes) of each line of the file, split at "\\n" only (str.splitlines
    would also split at U+2028, which JSON allows inside a string), without the "\\n"; None for the
    bytes of a line longer than MAX_LINE_BYTES, which is never held. `digest` sees every byte."""
    number, start_of_line, base = 1, 0, 0
    pending, too_long = bytearray(), False
    for chunk in stream_bounded(path, MAX_MANIFEST_BYTES):
        digest.update(chunk)
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end == -1 else chunk[start:end]
            if not too_long:
                too_long = len(pending) + len(piece) > MAX_LINE_BYTES
                if too_long:
                    pending.clear()
                else:
                    pending += piece
            if end == -1:
                break
            yield number, start_of_line, None if too_long else bytes(pending)
            number, start_of_line, start = number + 1, base + end + 1, end + 1
            pending.clear()
            too_long = False
        base += len(chunk)
    if pending or too_long:
        yield number, start_of_line, None if too_long else bytes(pending)


def _decode(path: Path, number: int, offset: int, data: bytes) -> str:
    if number == 1 and data.startswith(b"\xef\xbb\xbf"):  # a spreadsheet's byte order mark is not data
        data, offset = data[3:], 3
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {offset + exc.start})") from None


def _too_long(number: int) -> str:
    return f"line {number} is longer than the bound of {MAX_LINE_BYTES} bytes ({bound_text(MAX_LINE_BYTES)})"


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members; a name given twice is refused rather than the last taken."""
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"member {_shown(name)} appears twice")
            seen.add(name)
    return found


_ROW_JSON = json.JSONDecoder(object_pairs_hook=_no_repeats)
# What a derived key digests: json.dumps(parameters, sort_keys=True, separators=(",", ":")), made once.
_KEY_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _jsonl_rows(path: Path, digest: Any, rows: _Rows) -> Iterator[RunRow | Rejected]:
    for number, offset, data in _lines(path, digest):
        if data is None:
            yield rows.reject(number, [f"not a JSON object: {_too_long(number)}"], {"text": "(not kept)"})
            continue
        text = _decode(path, number, offset, data)
        if not text or text.isspace():
            continue
        try:
            row = _ROW_JSON.decode(text)
        except json.JSONDecodeError as exc:
            yield rows.reject(number, [f"not a JSON object: {exc.msg} at column {exc.colno}"], {"text": _cut(text)})
            continue
        except (ValueError, RecursionError) as exc:  # a number of over 4300 digits; arrays in arrays in ...
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            yield rows.reject(number, [f"not a JSON object: {reason}"], {"text": _cut(text)})
            continue
        if not isinstance(row, dict):
            yield rows.reject(number, [f"not a JSON object: a JSON {_json_kind(row)}"], {"text": _cut(text)})
            continue
        yield rows.check(number, row)


def _csv_lines(path: Path, digest: Any) -> Iterator[str]:
    for number, offset, data in _lines(path, digest):
        if data is None:
            raise ManifestError(f"{path}: {_too_long(number)}")
        yield _decode(path, number, offset, data) + "\n"


def _csv_rows(path: Path, digest: Any, rows: _Rows) -> Iterator[RunRow | Rejected]:
    reader = csv.reader(_csv_lines(path, digest))
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [name.strip() for name in header]
        if not any(names):
            raise ManifestError(f"{path}: line 1: the header row names no columns")
        repeated = next((name for name in names if name and names.count(name) > 1), None)
        if repeated is not None:
            raise ManifestError(f"{path}: line 1: column {_shown(repeated)} appears twice in the header")
        types = [CSV_TYPES.get(name) for name in names]
        end = reader.line_num
        for cells in reader:
            # A quoted cell may span lines: a row's line is the one it starts on.
            line, end = end + 1, reader.line_num
            if not cells:
                continue
            row = dict(zip(names, cells))
            given: dict[str, Any] = {}
            problems = []
            if len(cells) > len(names):
                problems.append(f"has {len(cells)} cells, the header names {len(names)} columns")
            for name, kind, text in zip(names, types, cells):
                if text == "":  # not given, but for an empty negative prompt
                    if name == "negative_prompt":
                        given[name] = ""
                elif kind is None:
                    given[name] = text
                else:
                    try:
                        given[name] = kind[0](text)
                    except (ValueError, KeyError):
                        problems.append(f"{name}={_shown(text)}: {kind[1]}")
            yield rows.check(line, row, given, problems)
    except csv.Error as exc:
        raise ManifestError(f"{path}: line {reader.line_num}: not CSV ({exc})") from None


def _parquet_rows(path: Path, digest: Any, rows: _Rows) -> Iterator[RunRow | Rejected]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_regular(path, MAX_MANIFEST_BYTES) as fd, os.fdopen(os.dup(fd), "rb") as file:
        # Parquet is read from its footer: the bytes are hashed in a pass of their own.
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
        file.seek(0)
        try:
            # No threads of Arrow's own: a hostile file then fails in this thread, as an exception.
            batches = pq.ParquetFile(file, pre_buffer=False).iter_batches(batch_size=256, use_threads=False)
            line = 0
            for batch in batches:
                records = batch.to_pylist()
                for record in records:
                    line += 1
                    # A null value is a field not given.
                    yield rows.check(line, {name: value for name, value in record.items() if value is not None})
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ManifestError(f"{path}: not a Parquet file ({_one_line(exc)})") from None


def _one_line(exc: Exception) -> str:
    return _cut(" ".join(str(exc).split()) or type(exc).__name__)


def _plain(value: Any) -> Any:
    """A value as JSON can hold it: bytes as their size, times in ISO 8601, anything else as text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _prompts_file(name: Any, base_dir: Path | None, fire_time: datetime | None, schedule: str | None,
                  where: str) -> list[str]:
    """The prompts of a file, one a line (blank lines skipped), placeholders filled."""
    if base_dir is None:
        raise ManifestError(f"{where}: an uploaded grid cannot name files: give its prompts as a list, not a "
                            "prompts_file")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: prompts_file must be the path of a text file, not {name!r}")
    path = base_dir / fill_placeholders(name, fire_time, schedule, where=f"{where}: prompts_file")
    data = _read(path, MAX_PROMPTS_FILE_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts = [fill_placeholders(line, fire_time, schedule, where=f"{path}: line {number}")
               for number, line in enumerate(text.splitlines(), start=1) if line and not line.isspace()]
    if not prompts:
        raise ManifestError(f"{path}: no prompts: the file has only blank lines")
    return prompts


def _size(value: Any, where: str, index: int) -> tuple[Any, Any]:
    if isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        return int(match[1]), int(match[2])
    if isinstance(value, list) and len(value) == 2:
        return value[0], value[1]  # the request's bounds check them, row by row
    raise ManifestError(f'{where}: sizes[{index}]={value!r}: a size is "WxH" (e.g. "768x512") or [W, H]')


def _seeds(spec: Any, fire_time: datetime | None, where: str) -> Sequence[Any]:
    """A list of seeds, or a range: {start, stop} (stop exclusive), {start, count} or
    {from_fire_time = true, count} (the same seeds for a firing made twice)."""
    forms = "a list, {start = S, stop = E}, {start = S, count = N} or {from_fire_time = true, count = N}"
    if isinstance(spec, list):
        if not spec:
            raise ManifestError(f"{where}: seeds must not be empty")
        return spec
    if not isinstance(spec, dict) or set(spec) not in ({"start", "stop"}, {"start", "count"},
                                                       {"from_fire_time", "count"}):
        raise ManifestError(f"{where}: seeds={spec!r}: seeds are {forms}")
    for name, value in spec.items():
        if name != "from_fire_time" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ManifestError(f"{where}: seeds.{name}={value!r}: must be a whole number")
    if "from_fire_time" in spec:
        if spec["from_fire_time"] is not True:
            raise ManifestError(f"{where}: seeds.from_fire_time={spec['from_fire_time']!r}: must be true")
        if fire_time is None:
            raise ManifestError(f"{where}: seeds = {{from_fire_time = true}} only works for a schedule's firing: "
                                "there is no fire time here")
        start = int(fire_time.timestamp())
    else:
        start = spec["start"]
    stop = spec["stop"] if "stop" in spec else start + spec["count"]
    if stop <= start:
        raise ManifestError(f"{where}: seeds={spec!r}: gives no seeds")
    if stop - start > MAX_GRID_ROWS:  # before len(), which fails past 2**63
        raise ManifestError(f"{where}: seeds={spec!r}: {stop - start:,} seeds, more than the bound of "
                            f"{MAX_GRID_ROWS:,} rows")
    return range(start, stop)


def _shown(value: Any) -> str:
    """A value as a refusal shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_kind(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
